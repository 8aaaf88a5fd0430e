"""One call of the attention op, typed and validated once.

The op boundary (``fusepass.ops.dispatch``) builds an :class:`AttentionCall` (and, for the
backward, a :class:`BackwardCall`) from the op's arguments; the reference, the kernel
launchers and the autotuner all take it, so an argument is named in one place and checked the
same way whatever then runs.  Bad input is a ``ValueError`` naming the problem, never a crash
inside a kernel.

Checks depend only on shapes, strides, dtypes, devices and the scalar parameters, all of which
:meth:`AttentionCall.signature` holds; a signature seen before is not checked again (a decode
loop calls the op with the same signature once per layer per token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
from torch import Tensor

from fusepass.masks import predicate
from fusepass.options import RunOptions

# Signatures already validated (bounded: dynamic lengths make a new one per length).
_VALID_MAX = 4096
_valid: set = set()


def _fail(msg: str):
    raise ValueError(f"fusepass.attention: {msg}")


class _memo:
    """``functools.cached_property`` without its lock (Python 3.11 takes one per access): the
    value is computed once and then found in the instance's ``__dict__``.  The calls are frozen,
    so it never goes stale."""

    def __init__(self, fn) -> None:
        self.fn, self.name = fn, fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


def tensor_signature(t: Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device)


# The op's output layout, owned here: every path that makes ``out`` (the fake, the reference,
# each kernel family, the ring's merge) makes it through ``out_tensor``, and the kernels write it
# through ``out_strides``.
#
# out [B, Hq, M, Dv] is stored as [B, M, Hq, Dv], the layout SDPA's flash and efficient kernels
# return.  Attention code hands its output to the output projection as
# ``out.transpose(1, 2).reshape(B, M, Hq * Dv)`` (GPT-2, Llama, nanoGPT), which is then a view:
# autograd saves the projection's input and the op's ``out`` as one tensor, where a contiguous
# [B, Hq, M, Dv] out made the reshape a copy and both were saved.  NOTE: measured on CPU (issue
# 12, tests/test_saved_memory.py): GPT-2 saved one [B, M, hidden] tensor per layer more than the
# SDPA model (2 MiB of 45 for 2 layers of hidden 256, N=512, B=2, fp32); with this layout the
# same bytes as SDPA.  The backward's grad_out arrives in this layout too (the projection's
# gradient, viewed back), so it is not copied either.


def out_strides(batch, q_heads, q_len, v_head_dim) -> tuple:
    """The strides of the op's ``out`` of shape [B, Hq, M, Dv] (stored as [B, M, Hq, Dv])."""
    return (q_len * q_heads * v_head_dim, v_head_dim, q_heads * v_head_dim, 1)


def out_tensor(make, batch, q_heads, q_len, v_head_dim, **kwargs) -> Tensor:
    """``make((B, M, Hq, Dv), **kwargs)`` (``torch.empty``, ``torch.zeros``, a fake tensor's
    ``new_empty``, ...) seen as the op's ``out`` [B, Hq, M, Dv], with ``out_strides``."""
    return make((batch, q_len, q_heads, v_head_dim), **kwargs).transpose(1, 2)


def in_out_layout(out: Tensor) -> Tensor:
    """``out`` when it already has the op's output layout, else a copy of it that has (for
    results a path assembles itself, such as the ring's merge of its chunk pairs)."""
    if out.stride() == out_strides(*out.shape):
        return out
    return out_tensor(torch.empty, *out.shape, dtype=out.dtype, device=out.device).copy_(out)


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionCall:
    """q [B, Hq, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv] and what the op does with them
    (see ``fusepass/ops/attention.py`` for the semantics)."""

    q: Tensor
    k: Tensor
    v: Tensor
    biases: tuple[Tensor, ...] = ()
    masks: tuple[Tensor, ...] = ()
    seed: Optional[Tensor] = None
    scale: float = 1.0
    softcap: float = 0.0
    dropout_p: float = 0.0
    mask_fill: float = float("-inf")
    mask_expr: str = ""
    mask_args: tuple[int, ...] = ()
    run: RunOptions = RunOptions()

    @classmethod
    def build(cls, q: Tensor, k: Tensor, v: Tensor, biases=(), masks=(), seed: Optional[Tensor] = None, *,
              scale: Optional[float] = None, softcap: float = 0.0, dropout_p: float = 0.0,
              mask_fill: float = float("-inf"), mask_expr: str = "", mask_args=(),
              run: RunOptions = RunOptions()) -> "AttentionCall":
        """The validated call (``scale`` None: ``D ** -0.5``)."""
        # The frozen dataclass's __init__ sets each of the 13 fields through object.__setattr__
        # (4 µs a call on CPU, on every op call); one dict update is what it amounts to.
        call = object.__new__(cls)
        call.__dict__.update(zip(_CALL_FIELDS, (
            q, k, v, tuple(biases), tuple(masks), seed, float(q.shape[-1] ** -0.5 if scale is None else scale),
            float(softcap), float(dropout_p), float(mask_fill), mask_expr, tuple(int(a) for a in mask_args), run)))
        call.validate()
        return call

    # Shapes, by their names in the op's notation.
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def v_head_dim(self) -> int:
        return self.v.shape[3]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.q_heads // self.kv_heads if self.kv_heads else 1

    @property
    def empty(self) -> bool:
        """No score exists (no rows or no keys): nothing to launch."""
        B, H, M, _ = self.q.shape
        return B * H * M == 0 or self.k.shape[2] == 0

    def params(self) -> tuple:
        """The scalar parameters (hashable)."""
        return (self.scale, self.softcap, self.dropout_p, self.mask_fill, self.mask_expr, self.mask_args)

    @_memo
    def signature(self) -> tuple:
        """Everything but tensor contents: what validation and launch plans depend on."""
        return (tuple(tensor_signature(t) for t in (self.q, self.k, self.v, *self.biases, *self.masks)),
                len(self.biases), self.seed is not None, self.params(), self.run)

    @_memo
    def structure(self) -> tuple:
        """The signature without what changes from one decode step to the next: the key length,
        the strides that follow from it, and the values of the mask arguments (a predicate's
        cache position, ``a0 >= j``, moves by one per step; only their count is kept)."""
        tensors, n_biases, seeded, params, run = self.signature
        return (tensors[0], self.k.shape[:2], self.k.dtype, self.v_head_dim, tuple(t[2] for t in tensors[3:]),
                n_biases, seeded, (*params[:-1], len(self.mask_args)), run)

    def validate(self) -> None:
        key = self.signature
        if key in _valid:
            return
        self._check_tensors()
        self._check_params()
        if len(_valid) >= _VALID_MAX:
            _valid.clear()
        _valid.add(key)

    def _check_tensors(self) -> None:
        q, k, v = self.q, self.k, self.v
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            _fail(f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        B, Hq, M, D = q.shape
        Bk, Hkv, N, Dk = k.shape
        if (Bk, Hkv, N) != tuple(v.shape[:3]):
            _fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on [B, H, N]")
        if Bk != B or Dk != D:
            _fail(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
        if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv != 0):  # no heads at all is empty, as in eager
            _fail(f"query heads {Hq} are not a multiple of key/value heads {Hkv}")
        if not (q.dtype == k.dtype == v.dtype):
            _fail(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if not q.dtype.is_floating_point:
            _fail(f"dtype {q.dtype} is not a floating dtype")
        if not (q.device == k.device == v.device):
            _fail(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
        target = (B, Hq, M, N)
        for kind, tensors in (("bias", self.biases), ("mask", self.masks)):
            for t in tensors:
                if t.dim() > 4 or any(s not in (1, want) for s, want in zip(t.shape[::-1], target[::-1])):
                    _fail(f"{kind} of shape {tuple(t.shape)} does not broadcast to [B, H, M, N] = {list(target)}")
                if t.device != q.device:
                    _fail(f"{kind} is on {t.device}, q on {q.device}")
        for t in self.masks:
            if t.dtype != torch.bool:
                _fail(f"masks must be bool (True = keep), got {t.dtype}")
        for t in self.biases:
            if not t.dtype.is_floating_point:
                _fail(f"biases must be floating point, got {t.dtype}")
        if self.seed is not None and (self.seed.numel() != 1 or self.seed.dtype.is_floating_point):
            _fail(f"seed must be one integer, got a {self.seed.dtype} tensor of shape {tuple(self.seed.shape)}")

    def _check_params(self) -> None:
        if not math.isfinite(self.scale):
            _fail(f"scale must be finite, got {self.scale}")
        if not (math.isfinite(self.softcap) and self.softcap >= 0.0):
            _fail(f"softcap must be 0 (none) or a positive number, got {self.softcap}")
        if not 0.0 <= self.dropout_p < 1.0:
            _fail(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        if self.dropout_p > 0 and self.seed is None:
            _fail("dropout_p > 0 needs a seed tensor")
        if not (math.isfinite(self.mask_fill) or self.mask_fill == float("-inf")):
            _fail(f"mask_fill must be -inf or finite, got {self.mask_fill}")
        if self.mask_expr:
            predicate.parse_ast(self.mask_expr)  # raises PredicateError (a ValueError) naming the problem
            if not predicate.is_boolean(self.mask_expr):
                _fail(f"mask predicate {self.mask_expr!r} is not bool (a comparison, or & | ~ of comparisons)")
            need = predicate.arg_count(self.mask_expr)
            if need > len(self.mask_args):
                _fail(f"mask predicate {self.mask_expr!r} uses {need} mask_args, got {len(self.mask_args)}")


_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionCall))


@dataclasses.dataclass(frozen=True, eq=False)
class BackwardCall:
    """The backward of ``forward``: the incoming gradient of ``out``, the forward's ``out`` and
    ``lse``, and which biases want a gradient."""

    forward: AttentionCall
    grad_out: Tensor
    out: Tensor
    lse: Tensor
    bias_needs_grad: tuple[bool, ...] = ()

    @classmethod
    def build(cls, forward: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor,
              bias_needs_grad=()) -> "BackwardCall":
        needs = tuple(bool(n) for n in bias_needs_grad) or (False,) * len(forward.biases)
        call = cls(forward, grad_out, out, lse, needs)
        call.validate()
        return call

    @_memo
    def signature(self) -> tuple:
        return (self.forward.signature, tensor_signature(self.grad_out), tensor_signature(self.out),
                tensor_signature(self.lse), self.bias_needs_grad)

    def validate(self) -> None:
        key = self.signature
        if key in _valid:
            return
        self.forward.validate()
        f = self.forward
        want_out = (f.batch, f.q_heads, f.q_len, f.v_head_dim)
        for name, t in (("grad_out", self.grad_out), ("out", self.out)):
            if tuple(t.shape) != want_out:
                _fail(f"{name} has shape {tuple(t.shape)}, the forward's output is {list(want_out)}")
            if t.device != f.q.device:
                _fail(f"{name} is on {t.device}, q on {f.q.device}")
        if tuple(self.lse.shape) != want_out[:3] or self.lse.dtype != torch.float32:
            _fail(f"lse must be fp32 of shape {list(want_out[:3])}, got {self.lse.dtype} {tuple(self.lse.shape)}")
        if len(self.bias_needs_grad) != len(f.biases):
            _fail(f"bias_needs_grad has {len(self.bias_needs_grad)} flags for {len(f.biases)} biases")
        if len(_valid) >= _VALID_MAX:
            _valid.clear()
        _valid.add(key)
