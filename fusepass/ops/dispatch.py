"""Chooses how the op runs for given inputs: the generated Triton kernels (with the config the
autotuner gives them) or the PyTorch reference.  The one wiring point of the runtime: the
kernels know nothing of the tuner.

Inputs are validated here, once, so that bad input gets a clear error instead of a crash
deep inside a kernel.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from fusepass.autotune import provider as tuning  # the one place launches meet the tuner
from fusepass.options import RunOptions

log = logging.getLogger(__name__)


def validate(q: Tensor, k: Tensor, v: Tensor, biases, masks) -> None:
    def fail(msg: str):
        raise ValueError(f"fusepass.attention: {msg}")

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        fail(f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, M, D = q.shape
    Bk, Hkv, N, Dk = k.shape
    if (Bk, Hkv, N) != tuple(v.shape[:3]):
        fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on [B, H, N]")
    if Bk != B or Dk != D:
        fail(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv != 0):  # no heads at all is empty, as in eager
        fail(f"query heads {Hq} are not a multiple of key/value heads {Hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        fail(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        fail(f"dtype {q.dtype} is not a floating dtype")
    if not (q.device == k.device == v.device):
        fail(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    target = (B, Hq, M, N)
    for kind, tensors in (("bias", biases), ("mask", masks)):
        for t in tensors:
            if t.dim() > 4 or any(s not in (1, want) for s, want in zip(t.shape[::-1], target[::-1])):
                fail(f"{kind} of shape {tuple(t.shape)} does not broadcast to [B, H, M, N] = {list(target)}")
            if t.device != q.device:
                fail(f"{kind} is on {t.device}, q on {q.device}")
    for t in masks:
        if t.dtype != torch.bool:
            fail(f"masks must be bool (True = keep), got {t.dtype}")
    for t in biases:
        if not t.dtype.is_floating_point:
            fail(f"biases must be floating point, got {t.dtype}")


def validate_params(seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args) -> None:
    """The op's scalar parameters, checked the same way whichever implementation then runs."""
    from fusepass.masks import predicate

    def fail(msg: str):
        raise ValueError(f"fusepass.attention: {msg}")

    if not math.isfinite(scale):
        fail(f"scale must be finite, got {scale}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        fail(f"softcap must be 0 (none) or a positive number, got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and seed is None:
        fail("dropout_p > 0 needs a seed tensor")
    if mask_expr:
        predicate.parse_ast(mask_expr)  # raises PredicateError (a ValueError) naming the problem
        if not predicate.is_boolean(mask_expr):
            fail(f"mask predicate {mask_expr!r} is not bool (a comparison, or & | ~ of comparisons)")
        need = predicate.arg_count(mask_expr)
        if need > len(mask_args):
            fail(f"mask predicate {mask_expr!r} uses {need} mask_args, got {len(mask_args)}")


def _kernel_reason(q: Tensor, v: Tensor, mask_fill: float, softcap: float = 0.0, run: RunOptions = RunOptions()):
    """None when the Triton kernels serve this call (see fusepass.kernels.support)."""
    from fusepass.kernels.support import runtime_reason

    reason = runtime_reason(q, v, mask_fill, softcap, interpret=run.interpret)
    if reason is not None:
        log.debug("fusepass.attention runs the reference: %s", reason)
    return reason


def forward(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run=""):
    validate(q, k, v, biases, masks)
    validate_params(seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args)
    options = RunOptions.decode(run)
    if _kernel_reason(q, v, mask_fill, softcap, options) is None:
        from fusepass.kernels.forward import attention_forward

        return attention_forward(
            q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args,
            autotune=options.autotune, config_for=tuning.kernel_config_provider,
        )
    from . import reference

    return reference.attention_forward(
        q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args
    )


def backward(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
             mask_fill, mask_expr, mask_args, bias_needs_grad, run=""):
    validate(q, k, v, biases, masks)
    validate_params(seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args)
    options = RunOptions.decode(run)
    args = (grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
            mask_fill, mask_expr, mask_args, bias_needs_grad)
    if _kernel_reason(q, v, mask_fill, softcap, options) is None:
        from fusepass.kernels.backward import attention_backward

        dq, dk, dv, dbiases = attention_backward(*args, autotune=options.autotune,
                                                 config_for=tuning.kernel_config_provider)
    else:
        from .reference import attention_backward

        dq, dk, dv, dbiases = attention_backward(*args)
    # The fake implementation promises contiguous bias gradients (no copy when they are).
    return dq, dk, dv, [g.contiguous() for g in dbiases]
