"""Chooses how the op runs for one call: the generated Triton kernels (with the config the
autotuner gives them) or the PyTorch reference.  The one wiring point of the runtime: the
kernels know nothing of the tuner.

The op's arguments become one validated :class:`fusepass.call.AttentionCall` here, so bad
input gets a clear error whatever then runs.  A CUDA call whose whole path follows from its
signature then leaves a *runner* (the kernels' launch with everything but the tensors bound):
a later call with the same signature, found by a key read straight from the op's arguments,
allocates and launches without building the call again (host time a decode step pays per
layer; docs/architecture.md).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from fusepass.autotune import provider as tuning  # the one place launches meet the tuner
from fusepass.call import AttentionCall, BackwardCall, in_out_layout
from fusepass.kernels import decode, forward as prefill, sm90, support
from fusepass.kernels.support import fp32_dot_precision
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


def _on_sm90(call: AttentionCall) -> bool:
    """Whether the prefill family's sm_90 kernel runs ``call`` (kernels/sm90.py has the rule;
    the FA2 forward runs the rest)."""
    if not _binds(call.q):
        return False
    reason = sm90.choice_refusal(call)
    if reason is not None:
        log.debug("fusepass.attention: the FA2 forward, not sm_90: %s", reason)
    return reason is None


def _backward_on_sm90(call: BackwardCall) -> bool:
    """Whether the sm_90 backward (the FA2 backward's kernels reading through TMA) runs ``call``."""
    if not _binds(call.forward.q):
        return False
    reason = sm90.backward_choice_refusal(call)
    if reason is not None:
        log.debug("fusepass.attention: the FA2 backward, not sm_90: %s", reason)
    return reason is None


def _prefill(call: AttentionCall):
    if _on_sm90(call):
        return sm90.attention_forward(call, config_for=tuning.kernel_config_provider)
    return prefill.attention_forward(call, config_for=tuning.kernel_config_provider)


def run_forward(call: AttentionCall):
    if kernel_reason(call) is None:
        if decode.serves(call):  # short queries, long keys: the split-KV family
            return decode.attention_forward(call)
        if call.run.fp8:
            from . import fp8_guard

            result = fp8_guard.forward(call, _prefill, tuning.kernel_config_provider)
            if result is not None:
                return result
        return _prefill(call)
    from . import reference

    return reference.attention_forward(call)


def run_backward(call: BackwardCall):
    if kernel_reason(call.forward) is None:
        if _backward_on_sm90(call):
            dq, dk, dv, dbiases = sm90.attention_backward(call, config_for=tuning.kernel_config_provider)
        else:
            from fusepass.kernels.backward import attention_backward

            dq, dk, dv, dbiases = attention_backward(call, config_for=tuning.kernel_config_provider)
    else:
        from .reference import attention_backward

        dq, dk, dv, dbiases = attention_backward(call)
    # The fake implementation promises contiguous bias gradients (no copy when they are).
    return dq, dk, dv, [g.contiguous() for g in dbiases]


# Runners by runner_key; _SEEN marks a key seen once (a runner is bound on its second call, so a
# cache that grows by one key per step binds nothing), _UNBOUND one that cannot have a runner.
# Bounded: dynamic lengths make a new key per length.
_RUNNERS_MAX = 1024
_SEEN, _UNBOUND = object(), object()
_runners: dict = {}


def runner_key(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run) -> tuple:
    """Everything a call's validation and path depend on, read from the op's arguments as they
    come (AttentionCall.signature's content, the TF32 setting an fp32 plan reads, and for short
    queries whether a CUDA graph is capturing the call: the family rule reads it)."""
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device,
            tuple([(t.shape, t.stride(), t.dtype, t.device) for t in biases]) if biases else (),
            tuple([(t.shape, t.stride(), t.dtype, t.device) for t in masks]) if masks else (),
            None if seed is None else (seed.shape, seed.dtype),
            scale, softcap, dropout_p, mask_fill, mask_expr, tuple(mask_args), run,
            fp32_dot_precision() if q.dtype == torch.float32 else None,
            q.dim() == 4 and q.shape[2] <= decode.MAX_QUERY_LEN and decode.capturing(q))


def _runner_for(call: AttentionCall):
    """The call's launch bound to its signature, or None when a later call may run otherwise
    (the reference, a ring) or needs per-call work (bool masks' block maps).  The family is the
    size rule's, with what is known of the structure (decode.moved: its calls take decode steps;
    the layers of a model make one signature's calls L times a step) without counting this call
    as a step again; either family computes the op exactly."""
    if call.run.context_parallel or call.run.fp8 or kernel_reason(call) is not None:
        return None  # fp8: the guard's decision and the quantization are per call
    if decode.size_refusal(call, growing=decode.moved(call), captured=decode.captured_serves(call)) is None:
        return decode.runner(call)
    if _on_sm90(call):
        return sm90.runner(call, tuning.kernel_config_provider)
    return prefill.runner(call, tuning.kernel_config_provider)


def _last_dim(t, N: int) -> tuple:
    """A bias's or mask's shape with its key axis (the last) written as "N" when it spans the keys."""
    shape = t.shape
    if not shape:
        return ()
    return (*shape[:-1], "N" if shape[-1] == N else shape[-1])


def growth_key(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args,
               run) -> Optional[tuple]:
    """runner_key without the key length, the strides of k, v, biases and masks, and the values
    of the mask arguments (the kernels take all three per call, and nothing validation or the
    decode plan reads depends on them): equal for the steps of a cache that grows by one key per
    step, or whose predicate's position (``a0 >= j``) moves by one.  Validation reads the key
    length only through the "N or 1" rule for biases and masks, which "N" in the key stands
    for, and the mask arguments only by their count; so a call with the key of a validated call
    validates too.  None when the length could be confused with a broadcast axis (N < 2) or the
    call is not short queries without dropout."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None  # validation says what is wrong
    N = k.shape[2]
    if N < 2 or q.shape[2] > decode.MAX_QUERY_LEN or dropout_p > 0 or q.numel() == 0:
        return None
    return (q.shape, q.stride(), q.dtype, q.device, k.shape[:2], k.shape[3], v.shape[:2], v.shape[3], v.shape[2] == N,
            k.dtype, v.dtype, k.device, v.device,
            tuple([(_last_dim(t, N), t.dtype, t.device) for t in biases]) if biases else (),
            tuple([(_last_dim(t, N), t.dtype, t.device) for t in masks]) if masks else (),
            None if seed is None else (seed.shape, seed.dtype),
            scale, softcap, dropout_p, mask_fill, mask_expr, len(mask_args), run,
            fp32_dot_precision() if q.dtype == torch.float32 else None)


# Growers (decode.grower) by growth_key, with the same markers: bound once a structure's family
# is decode at any length (see _grower_for), so a decode step (a new runner_key each step) skips
# building and validating the call from then on.
_growers: dict = {}


def _grower_for(call: AttentionCall):
    """A grower for ``call``'s structure once the decode family is its family whatever the
    length (known to take decode steps: decode.moved; or above the size rule's floor, where
    decode.serves does not track steps), _SEEN (ask again on its next call) until then,
    _UNBOUND when it never can have one.  A short structure that never moves (a query against
    a fixed set of keys) keeps its runner: the grower would run the decode family below the
    size rule's floor."""
    if call.run.context_parallel or kernel_reason(call) is not None:
        return _UNBOUND
    if decode.size_refusal(call, growing=True) is not None:
        return _UNBOUND
    if decode.moved(call) or decode.size_refusal(call) is None:
        return decode.grower(call)
    return _SEEN


def _binds(q) -> bool:
    """Whether calls on ``q``'s device take runners, growers and the sm_90 family (CUDA; the
    interpreter plans per call, and its tests stand it in for CUDA by patching this)."""
    return q.is_cuda


def _remember(table: dict, key: tuple, found, bind, call: AttentionCall) -> None:
    if len(table) >= _RUNNERS_MAX:
        table.clear()
    table[key] = (bind(call) or _UNBOUND) if found is _SEEN else _SEEN


def forward(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run=""):
    key = found = gkey = grown = None
    if _binds(q):
        # A structure known to take decode steps first: its calls (a new key length or cache
        # position per step, the same one for each layer of a step) are all the grower's.
        gkey = growth_key(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr,
                          mask_args, run)
        if gkey is not None:
            grown = _growers.get(gkey)
            if grown is not None and grown is not _SEEN and grown is not _UNBOUND:
                return grown(q, k, v, biases, masks, seed, mask_args)
        key = runner_key(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run)
        found = _runners.get(key)
        if found is not None and found is not _SEEN and found is not _UNBOUND:
            result = found(q, k, v, biases, masks, seed)
            if result is not None:  # None: this call's tensors need the full path (sm90.runner)
                return result
    call = forward_call(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run)
    if call.run.context_parallel:  # a ring over the sequence's ranks, each chunk pair run as any call
        from fusepass.parallel import ring

        out, lse = ring.forward(call, run_forward)
        return in_out_layout(out), lse  # the merge of its pairs is laid out as it came
    result = run_forward(call)
    if key is not None and (found is None or found is _SEEN):
        _remember(_runners, key, found, _runner_for, call)
    if gkey is not None and grown is not _UNBOUND:
        if len(_growers) >= _RUNNERS_MAX:
            _growers.clear()
        _growers[gkey] = _grower_for(call)
    return result


# Backward runners by backward_runner_key, with the forward's markers: a training step calls the
# backward of each layer's signature once a step, so its second step binds them.
_backward_runners: dict = {}


def backward_runner_key(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
                        mask_fill, mask_expr, mask_args, bias_needs_grad, run) -> tuple:
    """runner_key of the forward's arguments and what the backward call adds to them."""
    return (runner_key(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run),
            grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.device, out.shape, out.stride(), out.dtype,
            out.device, lse.shape, lse.stride(), lse.dtype, lse.device, tuple(bias_needs_grad))


def _backward_runner_for(call: BackwardCall):
    """The backward's launches bound to its signature (kernels/backward.py's ``bind_plan``), or
    None (the reference, a ring, block maps read from masks)."""
    if call.forward.run.context_parallel or kernel_reason(call.forward) is not None:
        return None
    if _backward_on_sm90(call):
        return sm90.backward_runner(call, tuning.kernel_config_provider)
    from fusepass.kernels import backward as prefill_backward

    return prefill_backward.runner(call, tuning.kernel_config_provider)


def backward(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
             mask_fill, mask_expr, mask_args, bias_needs_grad, run=""):
    key = found = None
    if _binds(q):
        key = backward_runner_key(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p,
                                  mask_fill, mask_expr, mask_args, bias_needs_grad, run)
        found = _backward_runners.get(key)
        if found is not None and found is not _SEEN and found is not _UNBOUND:
            result = found(grad_out, q, k, v, out, lse, biases, masks, seed)
            if result is not None:  # None: this call's tensors need the full path (sm90's alignment)
                dq, dk, dv, dbiases = result
                return dq, dk, dv, [g.contiguous() for g in dbiases]
    call = backward_call(grad_out, q, k, v, out, lse, biases, masks, seed, scale, softcap, dropout_p, mask_fill,
                         mask_expr, mask_args, bias_needs_grad, run)
    if call.forward.run.context_parallel:
        from fusepass.parallel import ring

        return ring.backward(call, run_backward)
    result = run_backward(call)
    if key is not None and (found is None or found is _SEEN):
        _remember(_backward_runners, key, found, _backward_runner_for, call)
    return result
