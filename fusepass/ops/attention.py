"""The fused attention op: ``torch.ops.fusepass.attention`` and its backward.

Notation: q [B, Hq, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv]; Hq = G * Hkv and query head h
reads key/value head h // G (native GQA: repeated K/V are never materialized).  Any strides.

What the op computes, in fp32 (fp64 for fp64 inputs)::

    s = scale * (q @ k^T)                        # [B, Hq, M, N]
    if softcap > 0:  s = softcap * tanh(s / softcap)
    s = s + sum(biases)                          # each broadcastable to [B, Hq, M, N]
    keep = AND(masks) & predicate(mask_expr)     # bool, True = visible
    s = where(keep, s, mask_fill)                # mask_fill: -inf, or a finite value (eager's finfo.min)
    p = softmax(s, dim=-1)                       # a row of all -inf gives NaN, as eager does
    if dropout_p > 0:  p = p * keep_mask(seed) / (1 - dropout_p)
    out = (p @ v).to(v.dtype)                    # [B, Hq, M, Dv], stored as [B, M, Hq, Dv] (call.out_strides)
    lse = logsumexp(s, dim=-1)                   # fp32 [B, Hq, M]; backward and ring attention use it

``mask_expr`` is a predicate over b, h, i (query index), j (key index), M, N and a0, a1, ...
(the values of ``mask_args``, which may be symbolic sizes); "" means none.  See
``fusepass.masks.predicate`` for its grammar.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fusepass.call import out_tensor
from fusepass.options import RunOptions

from . import dispatch

log = logging.getLogger(__name__)


# The ops are defined on a torch.library.Library, not with torch.library.custom_op: the same
# dispatcher entries, fake implementations and autograd, without custom_op's per-call Python
# layers (an output-alias check and a Dynamo-disable wrapper: 23 against 15 µs a call on this
# schema, measured on CPU; see docs/architecture.md).
_lib = torch.library.Library("fusepass", "DEF")
_FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor[] biases, Tensor[] masks, Tensor? seed, float scale, "
    "float softcap, float dropout_p, float mask_fill, str mask_expr, SymInt[] mask_args, str run=\"\") "
    "-> (Tensor, Tensor)"
)
_lib.define("attention" + _FORWARD_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
# The same op without an autograd formula, for sites none of whose inputs can require grad
# (the rewrite emits it then: graph/rewrite.py).  Torch's C++ autograd fallback passes it
# through, where the Python autograd layer of ``attention`` costs ~7 µs a call (CPU, measured):
# host time a decode step pays once per layer.
_lib.define("attention_inference" + _FORWARD_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
_lib.define(
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor[] biases, "
    "Tensor[] masks, Tensor? seed, float scale, float softcap, float dropout_p, float mask_fill, str mask_expr, "
    "SymInt[] mask_args, bool[] bias_needs_grad, str run=\"\") -> (Tensor, Tensor, Tensor, Tensor[])",
    tags=(torch.Tag.pt2_compliant_tag,),
)


def _attention_impl(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run=""):
    return dispatch.forward(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run)


@functools.lru_cache(maxsize=64)
def _trainable_run(run: str) -> str:
    """The run string without fp8: the FP8 forward is for inference only, and a trainable call's
    backward must differentiate what its forward computed."""
    options = RunOptions.decode(run)
    return run if not options.fp8 else dataclasses.replace(options, fp8=None).encode()


def _trainable_impl(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run=""):
    return dispatch.forward(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args,
                            _trainable_run(run))


def _attention_backward_impl(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
                             mask_fill, mask_expr, mask_args, bias_needs_grad, run=""):
    """Gradients of q, k, v and of each bias whose flag is set (an empty tensor otherwise)."""
    return dispatch.backward(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
                             mask_fill, mask_expr, mask_args, bias_needs_grad, run)


_lib.impl("attention", _trainable_impl, "CompositeExplicitAutograd")
_lib.impl("attention_inference", _attention_impl, "CompositeExplicitAutograd")
_lib.impl("attention_backward", _attention_backward_impl, "CompositeExplicitAutograd")
attention = torch.ops.fusepass.attention.default
attention_inference = torch.ops.fusepass.attention_inference.default
FORWARD_OPS = (attention, attention_inference)  # what a fused site calls
attention_backward = torch.ops.fusepass.attention_backward.default


@torch.library.register_fake("fusepass::attention_inference")
@torch.library.register_fake("fusepass::attention")
def _attention_fake(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args,
                    run=""):
    B, Hq, M, _ = q.shape
    out = out_tensor(q.new_empty, B, Hq, M, v.shape[-1], dtype=v.dtype)
    lse = q.new_empty((B, Hq, M), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("fusepass::attention_backward")
def _attention_backward_fake(
    grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
    mask_fill, mask_expr, mask_args, bias_needs_grad, run="",
):
    # Bias gradients are contiguous whatever the bias's strides (dispatch.backward ensures it):
    # a T5 bias is a permuted embedding, and Inductor checks the real strides against these.
    dbiases = [b.new_empty(b.shape) if need else b.new_empty((0,)) for b, need in zip(biases, bias_needs_grad)]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbiases


def _setup_context(ctx, inputs, output):
    q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run = inputs
    out, lse = output
    ctx.n_biases = len(biases)
    ctx.n_masks = len(masks)
    ctx.has_seed = seed is not None
    ctx.bias_needs_grad = [bool(b.requires_grad) for b in biases]
    ctx.features = (scale, softcap, dropout_p, mask_fill, mask_expr, list(mask_args))
    ctx.run = run  # the backward runs as its forward was asked to
    saved = [q, k, v, out, lse, *biases, *masks]
    if seed is not None:
        saved.append(seed)
    ctx.save_for_backward(*saved)
    # lse is an auxiliary output: without this, autograd materializes a zero grad for it
    # whenever out alone is differentiated, and _backward would refuse every backward.
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _same_strides(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` provably have the same strides (symbolic ones too, without a guard)."""
    return all(statically_known_true(x == y) for x, y in zip(a.stride(), b.stride()))


def _backward(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    rest = saved[5:]
    biases = list(rest[: ctx.n_biases])
    masks = list(rest[ctx.n_biases : ctx.n_biases + ctx.n_masks])
    seed = rest[-1] if ctx.has_seed else None
    scale, softcap, dropout_p, mask_fill, mask_expr, mask_args = ctx.features
    if grad_lse is not None:
        # NOTE: the lse output exists for backward and for ring attention; nothing in a user's
        # graph differentiates through it, and we say so rather than return a wrong gradient.
        raise RuntimeError("fusepass.attention: gradients through the lse output are not supported")
    if grad_out is None:  # grads are not materialized (see _setup_context): all zero
        dq = dk = dv = None
        bias_grads = [None] * ctx.n_biases
    else:
        # grad_out in out's layout (the output projection's gradient viewed back) is read as
        # it is; anything else (an expanded ones from .sum()) is made dense first.
        if not _same_strides(grad_out, out):
            grad_out = grad_out.contiguous()
        dq, dk, dv, dbiases = attention_backward(
            grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
            mask_fill, mask_expr, mask_args, ctx.bias_needs_grad, ctx.run,
        )
        bias_grads = [g if need else None for g, need in zip(dbiases, ctx.bias_needs_grad)]
    # The returned structure must match register_autograd's flattening of the inputs: a non-empty int
    # list is one leaf (grad None) but an empty list is an empty list; and the dispatcher drops
    # a trailing argument equal to its default, so run="" has no slot.
    grads = (dq, dk, dv, bias_grads, [None] * ctx.n_masks, None, None, None, None, None, None,
             None if mask_args else [])
    return grads + ((None,) if ctx.run else ())


torch.library.register_autograd("fusepass::attention", _backward, setup_context=_setup_context)


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    biases: Sequence[Tensor] = (),
    masks: Sequence[Tensor] = (),
    scale: float | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    mask_fill: float = float("-inf"),
    mask_expr: str = "",
    mask_args: Sequence[int] = (),
    seed: Tensor | None = None,
) -> Tensor:
    """Call the op directly (the backend emits the same call); returns ``out`` only."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if dropout_p > 0 and seed is None:
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    out, _ = attention(
        q, k, v, list(biases), list(masks), seed, float(scale), float(softcap), float(dropout_p),
        float(mask_fill), mask_expr, list(mask_args),
    )
    return out
