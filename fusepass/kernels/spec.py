"""What a kernel must do, as one frozen dataclass: the structural variants of the templates.

Everything that changes the generated code lives here (and in the render key); everything
that does not (scale, softcap value, dropout rate, sequence lengths, strides) is a runtime
argument, so one compiled kernel serves every sequence length (dynamic shapes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from fusepass.masks.predicate import arg_count

from .predicate_triton import to_triton

if TYPE_CHECKING:
    from fusepass.call import AttentionCall

from .limits import FINITE_FILL_LIMIT, next_pow2, padded_head_dim, value_tile_dim  # noqa: F401 (re-exported)


def bias_grad_mode(bias: torch.Tensor, target: Sequence[int]) -> str:
    """How the kernel writes a bias gradient: "store" when the bias has the full [B, H, M, N]
    shape (each element belongs to one program), else "atomic" with in-tile sums over M / N."""
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    reduced = [s == 1 and t != 1 for s, t in zip(shape, target)]
    if not any(reduced):
        return "store"
    return "atomic" + ("_m" if reduced[2] else "") + ("_n" if reduced[3] else "")


def per_key(t: torch.Tensor) -> bool:
    """Whether a mask or bias broadcasts over query rows ([B, H, 1, N], or expanded from it with
    a 0 row stride: a key-padding mask), so that the kernels read it as one vector per key tile
    instead of a tile of repeated rows.  Strides are part of the call's signature, which keys
    the launch plans."""
    return t.dim() < 2 or t.shape[-2] == 1 or t.stride(-2) == 0


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    n_biases: int = 0
    n_masks: int = 0
    expr: str = ""  # mask predicate over b, h, i, j, M, N, a<k>; "" = none
    n_args: int = 0
    softcap: bool = False
    dropout: bool = False
    finite_fill: bool = False  # mask_fill finite: rows that see no key average V over all keys
    head_dim: int = 64
    v_head_dim: int = 64
    precision: str = ""  # tl.dot input_precision for fp32 inputs ("tf32" / "ieee"); "" for half types
    upcast_dot: bool = False  # interpreter + bf16 / e4m3: dots in fp32 (the interpreter's bf16 dot is wrong)
    bias_grad: tuple[str, ...] = ()  # per bias: "" (no grad) or bias_grad_mode(); backward only
    fp8: bool = False  # e4m3 q, k, v with per-row / per-key / per-channel scales (kernels/fp8.py); forward only
    bias_per_key: tuple[bool, ...] = ()  # per bias: per_key(); () = none is
    mask_per_key: tuple[bool, ...] = ()  # per bool mask: per_key(); () = none is

    @property
    def exact_fp32(self) -> bool:
        """fp32 inputs with IEEE dots, held to eager's fp32 rounding (cuBLAS on the GPU): the
        templates sum q.k in fp64, recompute every row's statistics in the backward and sum
        the gradients with compensation (``exact_fp32`` in templates/_score.py.jinja and
        docs/architecture.md).  TF32 dots are as coarse as eager's TF32 matmuls already."""
        return self.precision == "ieee"

    @property
    def natural_units(self) -> bool:
        """Whether the kernels keep scores in natural units (``nat`` in
        templates/_score.py.jinja) instead of log2 units: with biases, which may be large
        finite fills, and for exact fp32, where s * LOG2E would round |s| * 6e-8 off each
        exponent that eager's exact s - max does not.  Such variants' backward also takes the
        row statistics of ``attn_bwd_rowstats``."""
        return self.n_biases > 0 or self.exact_fp32

    @property
    def block_map(self) -> bool:
        # Tile lists from the predicate (per (b, h) when it reads b or h) and/or from the bool
        # masks (computed on the device per call): empty tiles skipped, full ones unmasked.
        return bool(self.expr) or self.n_masks > 0

    def render_params(self) -> dict[str, Any]:
        names = {"b": "off_b", "h": "off_h", "i": "ii", "j": "jj", "M": "M", "N": "N"}
        names.update({f"a{k}": f"a{k}" for k in range(self.n_args)})
        return dict(
            n_biases=self.n_biases,
            n_masks=self.n_masks,
            n_args=self.n_args,
            nat=self.natural_units,
            exact_fp32=self.exact_fp32,
            pred=to_triton(self.expr, names) if self.expr else "",
            block_map=self.block_map,
            softcap=self.softcap,
            dropout=self.dropout,
            finite_fill=self.finite_fill,
            even_d=self.head_dim == padded_head_dim(self.head_dim),
            even_dv=self.v_head_dim == value_tile_dim(self.head_dim, self.v_head_dim),
            precision=self.precision,
            upcast_dot=self.upcast_dot,
            bias_grad=list(self.bias_grad) or [""] * self.n_biases,
            bias_per_key=list(self.bias_per_key) or [False] * self.n_biases,
            mask_per_key=list(self.mask_per_key) or [False] * self.n_masks,
            fp8=self.fp8,
            e4m3_round=self.fp8 and self.upcast_dot,
        )

    @classmethod
    def for_call(cls, call: "AttentionCall", bias_needs_grad: Optional[Sequence[bool]] = None) -> "KernelSpec":
        """The variant that serves ``call``; with ``bias_needs_grad``, its backward's."""
        q, v = call.q, call.v
        precision = ""
        if q.dtype == torch.float32:
            from .support import fp32_dot_precision  # support imports this module

            precision = fp32_dot_precision()
        target = (call.batch, call.q_heads, call.q_len, call.kv_len)
        grads = ()
        if bias_needs_grad is not None:
            grads = tuple(bias_grad_mode(b, target) if need else "" for b, need in zip(call.biases, bias_needs_grad))
        return cls(
            n_biases=len(call.biases),
            n_masks=len(call.masks),
            expr=call.mask_expr,
            n_args=max(len(call.mask_args), arg_count(call.mask_expr)),
            softcap=call.softcap > 0,
            dropout=call.dropout_p > 0,
            finite_fill=not math.isinf(call.mask_fill),
            head_dim=call.head_dim,
            v_head_dim=call.v_head_dim,
            precision=precision,
            # The interpreter's half-precision dot is wrong; for e4m3 the flag also rounds before
            # each cast (templates/_e4m3.py.jinja).
            upcast_dot=q.device.type != "cuda" and q.dtype in (torch.bfloat16, torch.float8_e4m3fn),
            bias_grad=grads,
            fp8=q.dtype == torch.float8_e4m3fn,
            bias_per_key=tuple(per_key(b) for b in call.biases),
            mask_per_key=tuple(per_key(m) for m in call.masks),
        )

    @classmethod
    def from_features(cls, pred: str = "", **kw: Any) -> "KernelSpec":
        """For ``render.show``: ``pred`` is the predicate text, the rest are field values."""
        kw.setdefault("n_args", arg_count(pred))
        return cls(expr=pred, **kw)
