"""Chooses how the op runs for one call: the generated Triton kernels (with the config the
autotuner gives them) or the PyTorch reference.  The one wiring point of the runtime: the
kernels know nothing of the tuner.

The op's arguments become one validated :class:`fusepass.call.AttentionCall` here, so bad
input gets a clear error whatever then runs.
"""

from __future__ import annotations

import functools
import logging

import torch

from fusepass.autotune import provider as tuning  # the one place launches meet the tuner
from fusepass.call import AttentionCall, BackwardCall
from fusepass.kernels import decode, support
from fusepass.options import RunOptions

log = logging.getLogger(__name__)


def forward_call(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args,
                 run="") -> AttentionCall:
    """The op's positional arguments as one validated call."""
    return AttentionCall.build(q, k, v, biases, masks, seed, scale=scale, softcap=softcap, dropout_p=dropout_p,
                               mask_fill=mask_fill, mask_expr=mask_expr, mask_args=mask_args,
                               run=RunOptions.decode(run))


def backward_call(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr,
                  mask_args, bias_needs_grad, run="") -> BackwardCall:
    """The backward op's positional arguments as one validated call."""
    call = forward_call(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run)
    return BackwardCall.build(call, grad_out, out, lse, bias_needs_grad)


def kernel_reason(call: AttentionCall):
    """None when the Triton kernels serve this call (see fusepass.kernels.support)."""
    q = call.q
    device = q.device
    interpret = call.run.interpret
    if device.type == "cuda":
        interpret = False  # the interpreter is for CPU tensors only (support.fallback_reason)
    elif interpret is None:
        interpret = support.interpret_requested()  # the environment, read per call
    return _reason(device, q.dtype, q.shape[3], call.v.shape[3], call.mask_fill, call.softcap, interpret)


@functools.lru_cache(maxsize=256)
def _reason(device, dtype, head_dim, v_head_dim, mask_fill, softcap, interpret):
    # Everything the decision reads is in the arguments: decided (and logged) once per kind of call.
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    reason = support.fallback_reason(device.type, dtype, head_dim, v_head_dim, mask_fill, interpret=interpret,
                                     capability=capability, softcap=softcap)
    if reason is not None:
        log.debug("fusepass.attention runs the reference: %s", reason)
    return reason


def run_forward(call: AttentionCall):
    if kernel_reason(call) is None:
        if decode.serves(call):  # short queries, long keys: the split-KV family
            return decode.attention_forward(call)
        from fusepass.kernels.forward import attention_forward

        return attention_forward(call, config_for=tuning.kernel_config_provider)
    from . import reference

    return reference.attention_forward(call)


def run_backward(call: BackwardCall):
    if kernel_reason(call.forward) is None:
        from fusepass.kernels.backward import attention_backward

        dq, dk, dv, dbiases = attention_backward(call, config_for=tuning.kernel_config_provider)
    else:
        from .reference import attention_backward

        dq, dk, dv, dbiases = attention_backward(call)
    # The fake implementation promises contiguous bias gradients (no copy when they are).
    return dq, dk, dv, [g.contiguous() for g in dbiases]


def forward(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run=""):
    call = forward_call(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run)
    if call.run.context_parallel:  # a ring over the sequence's ranks, each chunk pair run as any call
        from fusepass.parallel import ring

        return ring.forward(call, run_forward)
    return run_forward(call)


def backward(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
             mask_fill, mask_expr, mask_args, bias_needs_grad, run=""):
    call = backward_call(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p, mask_fill,
                         mask_expr, mask_args, bias_needs_grad, run)
    if call.forward.run.context_parallel:
        from fusepass.parallel import ring

        return ring.backward(call, run_backward)
    return run_backward(call)
