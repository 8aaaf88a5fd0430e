"""Hopper forward launcher: templates/attention_fwd_sm90.py.jinja -> ``attn_fwd_sm90`` -> ``attention_forward``.

The first member of the sm_90 family.  The kernel computes what the FA2 forward
(``fusepass.kernels.forward``) computes, with the same arguments and the same tile walk; it
reads Q, K and V through TMA tensor descriptors built in the kernel (device-side: the launch
arguments stay tensors and numbers, see ``kernels/launcher.py``) and may warp-specialize its
loop over full key tiles.  ``refusal`` is the rule that lets it serve a call (the FA2 forward
is the fallback for everything it refuses); ``configs_for`` is its autotune search space.

On CPU the kernel runs in Triton's interpreter (``refusal(call, interpret=True)``), which
emulates the descriptors: what the tests check numerically.

The backward (``attention_backward``, ``backward_refusal``) is the FA2 backward's template
(templates/attention_bwd.py.jinja) rendered with ``tma=True``: the same kernels, which read Q,
K, V, dO and O through TMA descriptors; its plans and launches are ``kernels/backward.py``'s.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from fusepass.autotune.config import BackwardConfig, ForwardConfig, arch_for, fits_registers, fits_shared_memory
from fusepass.call import AttentionCall, BackwardCall, out_strides, out_tensor

from . import backward, forward, render
from .heuristics import ConfigProvider, ConfigQuery
from .launch_common import (PlanCache, cdiv, extra_args, head_dims, launch_fitting, launches, new_output, plan_key,
                            scalar_args, seed_tensor)
from .launcher import Launcher
from .spec import KernelSpec
from .support import fallback_reason

log = logging.getLogger(__name__)

TEMPLATE = "attention_fwd_sm90.py.jinja"
FAMILY = "sm90"  # ConfigQuery.family: the tuner's key and space for this family
SERVED_DTYPES = (torch.float16, torch.bfloat16)
SERVED_HEAD_DIMS = (64, 128)  # D and Dv: powers of two, so the TMA boxes need no column mask
TMA_ALIGN = 16  # bytes: a descriptor's base address and every stride but the last (1)
# Calls this family served, by direction ("fwd", "bwd"): what tests read to know it ran.  Its
# kernels also count in launch_common.launches under the kernel kinds they share with FA2.
launches_sm90: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Sm90Config(ForwardConfig):
    """A forward config plus the sm_90 kernel's own knob: ``warp_specialize`` (0/1, an int like
    every cached knob) splits the full-tile key loop into TMA producer and compute warps."""

    warp_specialize: int = 0

    def short(self) -> str:
        return super().short() + (" ws" if self.warp_specialize else "")


# Feature tests of the installed Triton, never its version.

@functools.lru_cache(maxsize=1)
def has_tensor_descriptors() -> bool:
    """Whether ``tl.make_tensor_descriptor`` (device-side TMA descriptors) exists."""
    try:
        import triton.language as tl
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor")


@functools.lru_cache(maxsize=1)
def loop_warp_specialize() -> bool:
    """Whether ``tl.range`` takes ``warp_specialize=`` (the template's render flag ``loop_ws``)."""
    try:
        import triton.language as tl

        return "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    except (ImportError, TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _layout_reason(name: str, t: Tensor) -> Optional[str]:
    """Why ``t`` [B, H, L, D] cannot be read through TMA, or None.  Strides of size-1 dims
    never move the base pointer (their index is 0) and are replaced in the launch (``_tma_strides``)."""
    elt = t.element_size()
    if t.stride(3) != 1:
        return f"{name}'s last dim is not contiguous (stride {t.stride(3)}); TMA needs stride 1"
    for dim, label in ((0, "batch"), (1, "head"), (2, "row")):
        if t.shape[dim] > 1 and (t.stride(dim) * elt) % TMA_ALIGN:
            return f"{name}'s {label} stride {t.stride(dim)} is not a multiple of {TMA_ALIGN} bytes"
    if t.data_ptr() % TMA_ALIGN:
        return f"{name}'s data pointer is not {TMA_ALIGN}-byte aligned"
    return None


def refusal(call: AttentionCall, *, interpret: bool = False,
            capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    """None when the sm_90 kernel serves ``call``, else why (one line).

    CUDA tensors need a GPU of compute capability 9.x (``capability``, else the device's);
    CPU tensors are served only with ``interpret`` (Triton's interpreter: the tests), with no
    capability check.  The alignment of the data pointers is read here, so this is a per-call
    rule: a view offset by one element has the signature of an aligned one.
    """
    q = call.q
    cuda = q.device.type == "cuda"
    if cuda:
        capability = capability or _capability(q.device)
        if capability[0] != 9:
            return f"GPU compute capability {capability[0]}.{capability[1]} is not 9.x (Hopper)"
    reason = fallback_reason(q.device.type, q.dtype, call.head_dim, call.v_head_dim, call.mask_fill,
                             interpret=interpret and not cuda, capability=capability, softcap=call.softcap)
    if reason is not None:
        return reason
    if not has_tensor_descriptors():
        return "this Triton has no tl.make_tensor_descriptor"
    if q.dtype not in SERVED_DTYPES:
        return f"dtype {q.dtype} (the sm_90 kernel serves float16, bfloat16)"
    for label, d in (("head dim", call.head_dim), ("value head dim", call.v_head_dim)):
        if d not in SERVED_HEAD_DIMS:
            return f"{label} {d} (the sm_90 kernel serves {', '.join(map(str, SERVED_HEAD_DIMS))})"
    for name, t in (("q", q), ("k", call.k), ("v", call.v)):
        reason = _layout_reason(name, t)
        if reason is not None:
            return reason
    return None


# Configs.

_SM90 = arch_for((9, 0))

# NOTE: H200, bf16, B=4 H=16 (benchmarks/bench_sm90.py; RESULTS.md, ninth session): the best of
# configs_for was 128x64 w4 s2 at every D=128 shape (N 1k-16k, causal or not), 128x64 w4 s3 at
# most D=64 ones.  Warp-specialized configs failed to compile on triton 3.6 (NVGPUWarpSpecialization).
_DEFAULTS = {64: Sm90Config(128, 64, 4, 3), 128: Sm90Config(128, 64, 4, 2)}

# Which served calls the dispatch gives this family rather than the FA2 forward.  NOTE: same
# run: at D=128 this kernel beat the FA2 forward at every shape (518-536 against 462-485
# TFLOP/s at N >= 4k; 1.03-1.12x); at D=64 it lost at five of six (404 against 423 at 4k).
PREFERRED_HEAD_DIMS = (128,)


def choice_refusal(call: AttentionCall) -> Optional[str]:
    """None when the dispatch runs ``call`` on this family (served and faster than the FA2
    forward at its head dim), else why the FA2 forward runs it."""
    reason = refusal(call)
    if reason is None and max(call.head_dim, call.v_head_dim) not in PREFERRED_HEAD_DIMS:
        reason = f"head dim {max(call.head_dim, call.v_head_dim)}: the FA2 forward is faster there"
    return reason


def static_refusal(device_type: str, dtype: torch.dtype, head_dim: int, v_head_dim: int,
                   capability: Optional[tuple[int, int]]) -> Optional[str]:
    """The part of ``choice_refusal`` known at compile time (explain): no strides or pointers."""
    if device_type != "cuda":
        return "not a CUDA device"
    if capability is None or capability[0] != 9:
        return "not a Hopper GPU (compute capability 9.x)"
    if not has_tensor_descriptors():
        return "this Triton has no tl.make_tensor_descriptor"
    if dtype not in SERVED_DTYPES:
        return f"dtype {dtype}"
    if head_dim not in SERVED_HEAD_DIMS or v_head_dim not in SERVED_HEAD_DIMS:
        return f"head dims {head_dim}/{v_head_dim}"
    if max(head_dim, v_head_dim) not in PREFERRED_HEAD_DIMS:
        return f"head dim {max(head_dim, v_head_dim)}: the FA2 forward is faster there"
    return None


# What the autotuner should time on sm_90, by head dim (max of D, Dv): tiles of 64 or 128 keys,
# 4 or 8 warps, 2-4 stages, and the warp-specialized variant of the two likeliest winners.
_CANDIDATES = {
    64: ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 2), (64, 64, 4, 3)),
    128: ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
}
_WS_CANDIDATES = {64: ((128, 64, 4, 3), (128, 128, 8, 3)), 128: ((128, 64, 4, 2), (128, 128, 8, 2))}


def _dim_class(call: AttentionCall) -> int:
    return 64 if max(call.head_dim, call.v_head_dim) <= 64 else 128


def default_config(call: AttentionCall, *, interpret: bool = False) -> Sm90Config:
    """The config a launch runs with when none is given (interpreter: small tiles, cheap in numpy)."""
    if interpret:
        return Sm90Config(32, 32, 4, 1)
    return _DEFAULTS[_dim_class(call)]


def configs_for(call: AttentionCall) -> list[Sm90Config]:
    """The sm_90 autotune candidates for ``call``: those of its head dim that fit the H200's
    shared memory and registers (by the tuner's own estimates), warp-specialized ones only
    where this Triton can."""
    dims = _dim_class(call)
    cands = [Sm90Config(*c) for c in _CANDIDATES[dims]]
    if loop_warp_specialize():
        cands += [Sm90Config(*c, warp_specialize=1) for c in _WS_CANDIDATES[dims]]
    return [c for c in cands if _fits(c, call)]


def _fits(cfg: Sm90Config, call: AttentionCall) -> bool:
    return all(pred(cfg, _SM90, call.head_dim, call.q.dtype, value_head_dim=call.v_head_dim)
               for pred in (fits_shared_memory, fits_registers))


def _as_sm90(cfg: ForwardConfig) -> Sm90Config:
    """An Sm90Config for any forward config (a plain one: no warp specialization); the knob is
    dropped where this Triton cannot warp-specialize a loop."""
    if not isinstance(cfg, Sm90Config):
        cfg = Sm90Config(cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps, cfg.num_stages)
    if cfg.warp_specialize and not loop_warp_specialize():
        cfg = dataclasses.replace(cfg, warp_specialize=0)
    return cfg


def _query(direction: str, spec: KernelSpec, call: AttentionCall) -> ConfigQuery:
    """What this family asks the tuner for one launch of ``call`` (its own space and key)."""
    return ConfigQuery(direction, spec, call.q.dtype, call.batch, call.q_heads, call.kv_heads, call.q_len,
                       call.kv_len, call.q.device, call=call, autotune=call.run.autotune, family=FAMILY)


def _choose(call: AttentionCall, spec: KernelSpec, config: Optional[ForwardConfig],
            config_for: Optional[ConfigProvider], interpret: bool) -> Sm90Config:
    if config is None and config_for is not None:
        config = config_for(_query("fwd", spec, call))
    if config is not None and not isinstance(config, ForwardConfig):
        raise TypeError(f"fusepass: the sm_90 forward takes a ForwardConfig or Sm90Config, got {config!r}")
    return _as_sm90(config) if config is not None else default_config(call, interpret=interpret)


# The kernel module and Triton's allocator.

_modules: dict = {}


def render_params(spec: KernelSpec) -> dict:
    return dict(spec.render_params(), loop_ws=loop_warp_specialize())


def kernel_module(spec: KernelSpec, interpret: bool):
    """The rendered module of ``spec`` (memoized per spec, as launch_common.spec_module)."""
    mod = _modules.get((spec, interpret))
    if mod is None:
        mod = _modules[(spec, interpret)] = render.load(TEMPLATE, render_params(spec), interpret=interpret)
    return mod


_allocator_set = False


def _scratch(size: int, alignment: int, stream) -> Tensor:
    # torch's caching allocator: cheap per launch, and safe under CUDA-graph capture.
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=1)
def _allocator_slot():
    """(Triton's allocator variable, its null allocator's type), or None where this Triton
    keeps them elsewhere (then the allocator is set once per process)."""
    try:
        from triton.runtime import _allocation

        return _allocation._allocator, _allocation.NullAllocator
    except (ImportError, AttributeError):
        return None


def ensure_allocator() -> None:
    """Give Triton an allocator for the global scratch that device-side descriptors live in
    (Triton's default raises), unless one is set.  Triton keeps it in a ContextVar, so it is
    checked per launch: a thread of its own starts without one."""
    global _allocator_set
    slot = _allocator_slot()
    if slot is not None:
        if not isinstance(slot[0].get(), slot[1]):
            return
    elif _allocator_set:
        return
    import triton

    if hasattr(triton, "set_allocator"):
        triton.set_allocator(_scratch)
        _allocator_set = True


# Plans and launches.

def grid(M: int, B: int, Hq: int, cfg: ForwardConfig) -> tuple[int, int]:
    """One program per (query tile of BLOCK_M rows, batch * query head), as the FA2 forward:
    each program walks the key tiles its block-map row lists (or all of them)."""
    return (cdiv(M, cfg.BLOCK_M), B * Hq)


def _tma_strides(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides with those of size-1 dims replaced: batch / head by 0 (their offset is 0
    anyway), rows by the head dim rounded up to 16 bytes (a descriptor's row stride must be
    aligned even where only row 0 exists)."""
    per = TMA_ALIGN // t.element_size()
    row_pad = cdiv(t.shape[3], per) * per
    b, h, r, d = t.stride()
    B, H, L, _ = t.shape
    return (b if B > 1 else 0, h if H > 1 else 0, r if L > 1 else row_pad, d)


@dataclasses.dataclass
class _Plan:
    spec: KernelSpec
    cfg: Sm90Config  # the fitted config once the first launch ran
    kernel: object  # the rendered module's attn_fwd_sm90
    grid: tuple[int, int]
    tail: tuple
    map_args: Optional[list]  # None: read from the masks per call
    interpret: bool
    fitted: bool = False
    launchers: dict = dataclasses.field(default_factory=dict)

    def launcher(self, cfg: Sm90Config) -> Launcher:
        found = self.launchers.get(cfg)
        if found is None:
            consts = dict(head_dims(self.spec), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                          WARP_SPECIALIZE=bool(cfg.warp_specialize))
            found = self.launchers[cfg] = Launcher(self.kernel, consts, cfg.num_warps, cfg.num_stages,
                                                   direct=not self.interpret)
        return found


_plans = PlanCache()


def _make_plan(call: AttentionCall, config: Optional[ForwardConfig], config_for: Optional[ConfigProvider]) -> _Plan:
    spec = KernelSpec.for_call(call)
    q, k, v = call.q, call.k, call.v
    B, Hq, M, N = call.batch, call.q_heads, call.q_len, call.kv_len
    interpret = q.device.type != "cuda"
    cfg = _choose(call, spec, config, config_for, interpret)
    map_args = forward.signature_map_args(call, spec, cfg)
    # The output is allocated in the op's layout (fusepass.call.out_tensor).
    tail = (*_tma_strides(q), *_tma_strides(k), *_tma_strides(v), *out_strides(B, Hq, M, call.v_head_dim),
            Hq, call.groups, M, N,
            *scalar_args(spec, call.scale, call.softcap, call.dropout_p, call.mask_fill, N))
    return _Plan(spec, cfg, kernel_module(spec, interpret).attn_fwd_sm90, grid(M, B, Hq, cfg), tail, map_args,
                 interpret)


def _fit(plan: _Plan, launch) -> Sm90Config:
    """The first launch of a plan: fewer stages while shared memory does not fit
    (launch_common.launch_fitting); a warp-specialized config this Triton fails to compile
    for this variant runs unspecialized instead (logged once per plan)."""
    try:
        return launch_fitting(("fwd_sm90", plan.spec), plan.cfg, launch)
    except Exception as e:
        if not plan.cfg.warp_specialize:
            raise
        log.warning("fusepass: sm_90 forward %s failed (%s: %s); running without warp specialization",
                    plan.cfg.short(), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return launch_fitting(("fwd_sm90", plan.spec), dataclasses.replace(plan.cfg, warp_specialize=0), launch)


def fitted_config(call: AttentionCall, config: Optional[ForwardConfig] = None,
                  config_for: Optional[ConfigProvider] = None) -> Optional[Sm90Config]:
    """The config that ``attention_forward(call, config, config_for)`` really launches with
    (fewer stages, or no warp specialization, where the asked one did not build), or None
    before its first launch: what benchmarks report."""
    plan = _plans.get(plan_key(call, call.signature, config, config_for),
                      lambda: _make_plan(call, config, config_for))
    return plan.cfg if plan.fitted else None


def attention_forward(call: AttentionCall, config: Optional[ForwardConfig] = None,
                      config_for: Optional[ConfigProvider] = None) -> tuple[Tensor, Tensor]:
    """out [B, Hq, M, Dv] (v's dtype), lse [B, Hq, M] fp32: the op's semantics exactly, as
    ``fusepass.kernels.forward.attention_forward``.  The caller checked ``refusal(call)``."""
    q, v = call.q, call.v
    B, Hq, M = call.batch, call.q_heads, call.q_len
    if call.empty:
        # No keys: softmax over zero keys is empty, P @ V a sum of nothing, logsumexp -inf.
        return (out_tensor(torch.zeros, B, Hq, M, call.v_head_dim, dtype=v.dtype, device=q.device),
                torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device))
    plan = _plans.get(plan_key(call, call.signature, config, config_for),
                      lambda: _make_plan(call, config, config_for))
    out = out_tensor(new_output, B, Hq, M, call.v_head_dim, dtype=v.dtype, device=q.device)
    lse = new_output((B, Hq, M), torch.float32, q.device)
    map_args = plan.map_args if plan.map_args is not None else forward.data_map_args(call, plan.cfg)
    seed = seed_tensor(call.seed, q.device) if plan.spec.dropout else None
    extras = extra_args(call.biases, call.masks, call.mask_args)
    args = (q, call.k, v, out, lse, seed, *map_args, *extras)

    launches["fwd"] += 1  # a prefill forward, whichever family (forward_launches counts it)
    launches_sm90["fwd"] += 1
    if not plan.interpret:
        ensure_allocator()
        if plan.fitted:  # the hot path
            plan.launcher(plan.cfg)(plan.grid, *args, tail=plan.tail)
            return out, lse

    def launch(cfg: Sm90Config) -> None:
        plan.launcher(cfg)(plan.grid, *args, tail=plan.tail)

    with render.interpreting() if plan.interpret else contextlib.nullcontext():
        if plan.fitted:
            launch(plan.cfg)
        else:
            plan.cfg, plan.fitted = _fit(plan, launch), True
    return out, lse


def aligned(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the three data pointers are TMA-aligned (what a signature does not say)."""
    return (q.data_ptr() % TMA_ALIGN == 0 and k.data_ptr() % TMA_ALIGN == 0
            and v.data_ptr() % TMA_ALIGN == 0)


def runner(call: AttentionCall, config_for: Optional[ConfigProvider] = None) -> Optional[Callable]:
    """As ``fusepass.kernels.forward.runner``: a function of (q, k, v, biases, masks, seed) for
    later calls of ``call``'s signature, which returns None (the caller then takes the full
    path) for tensors whose data pointers are not TMA-aligned."""
    if call.empty:
        return None
    plan = _plans.get(plan_key(call, call.signature, None, config_for), lambda: _make_plan(call, None, config_for))
    return forward.bind_plan(call, plan, FAMILY, (launches, launches_sm90), admits=aligned, before_launch=ensure_allocator)



# The backward: templates/attention_bwd.py.jinja rendered with tma=True, launched by
# kernels/backward.py's plan machinery (the FA2 backward's plans, grids and arguments).

BWD_TEMPLATE = "attention_bwd.py.jinja"


def _overlap_reason(name: str, t: Tensor) -> Optional[str]:
    """Why ``t``'s rows cannot be a descriptor's rows (a row stride below the row's length,
    e.g. an expanded tensor), or None."""
    if t.shape[2] > 1 and t.stride(2) < t.shape[3]:
        return f"{name}'s rows overlap (row stride {t.stride(2)} < {t.shape[3]})"
    return None


def backward_refusal(bcall: BackwardCall, *, interpret: bool = False,
                     capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    """None when the sm_90 backward serves ``bcall``, else why (one line): ``refusal``'s rules
    for its forward call (capability 9.x, fp16/bf16, D and Dv in SERVED_HEAD_DIMS, TMA-readable
    q, k, v), the same layout rules for grad_out and out, and rows that do not overlap.  Like
    ``refusal``, a per-call rule (it reads the data pointers).  Everything it refuses runs on
    the FA2 backward (fp32, its exact mode included, other head dims, unaligned views)."""
    reason = refusal(bcall.forward, interpret=interpret, capability=capability)
    if reason is not None:
        return reason
    for name, t in (("grad_out", bcall.grad_out), ("out", bcall.out)):
        reason = _layout_reason(name, t)
        if reason is not None:
            return reason
    call = bcall.forward
    for name, t in (("q", call.q), ("k", call.k), ("v", call.v), ("grad_out", bcall.grad_out), ("out", bcall.out)):
        reason = _overlap_reason(name, t)
        if reason is not None:
            return reason
    return None


# Which served backward calls the dispatch gives this family.  NOTE: H200, bf16, B=4 H=16 D=128
# N=4096 (bench_sm90.py --backward, one run, RESULTS.md ninth session): forward+backward 388 /
# 350 TFLOP/s (causal) against the FA2 pair's 322 / 308.  D=64 is unmeasured: the forward's
# rule (D=128 only) until it is.
PREFERRED_BACKWARD_HEAD_DIMS = (128,)


def backward_choice_refusal(bcall: BackwardCall) -> Optional[str]:
    """None when the dispatch should run ``bcall`` on the sm_90 backward (served, at a
    preferred head dim), else why the FA2 backward runs it."""
    reason = backward_refusal(bcall)
    call = bcall.forward
    if reason is None and max(call.head_dim, call.v_head_dim) not in PREFERRED_BACKWARD_HEAD_DIMS:
        reason = f"head dim {max(call.head_dim, call.v_head_dim)}: the FA2 backward runs it"
    return reason


# The FA2 backward's measured H200 winners (kernels/heuristics.py: own 128 step 64 w8 at both
# head dims, own 64 step 64 w4 s2 at D=128 with N <= 2k) with at least two stages, since the
# TMA loads of Q and dO are what the pipeline overlaps.  NOTE: H200, bf16, B=4 H=16 D=128
# N=4096 (bench_sm90.py --backward, one run): own 64 step 64 w4 s2 was the best of
# _BWD_CANDIDATES causal or not (fwd+bwd 388 / 350 TFLOP/s; cuDNN 536 / 512, FA2 322 / 308),
# so it is D=128's default at every N; D=64 is unmeasured.
_BWD_DEFAULTS = {64: BackwardConfig(128, 64, 8, 2), 128: BackwardConfig(64, 64, 4, 2)}
_BWD_SHORT = {64: BackwardConfig(128, 64, 8, 2), 128: BackwardConfig(64, 64, 4, 2)}  # N <= 2048
_BWD_SHORT_N = 2048

# The backward's search space by head dim (max of D, Dv): (BLOCK_OWN, BLOCK_STEP, warps, stages).
_BWD_CANDIDATES = {
    64: ((128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)),
    128: ((128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 1), (128, 32, 8, 2)),
}


def backward_default_config(bcall: BackwardCall, *, interpret: bool = False) -> BackwardConfig:
    """The backward's config when none is given (interpreter: the FA2 backward's small tiles)."""
    if interpret:
        return BackwardConfig(32, 32, 4, 1)
    return _backward_default(bcall.forward)


def _backward_default(call: AttentionCall) -> BackwardConfig:
    table = _BWD_SHORT if call.kv_len <= _BWD_SHORT_N else _BWD_DEFAULTS
    return table[_dim_class(call)]


def backward_configs_for(bcall: BackwardCall) -> list[BackwardConfig]:
    """The sm_90 backward's candidates for ``bcall`` that fit the H200 (the tuner's estimates)."""
    return _backward_candidates(bcall.forward)


def _backward_candidates(call: AttentionCall) -> list[BackwardConfig]:
    cands = [BackwardConfig(*c) for c in _BWD_CANDIDATES[_dim_class(call)]]
    return [c for c in cands if _fits(c, call)]


def tuning_space(direction: str, call: AttentionCall) -> tuple[ForwardConfig | BackwardConfig, list]:
    """(default, candidates) the autotuner times for this family's ``direction`` ("fwd", "bwd")
    kernels on ``call``'s shape.  Forward candidates are plain ForwardConfigs: the
    warp-specialized ones do not build on triton 3.6 for sm_90 (RESULTS.md, ninth session), and
    the cache's forward entries have no warp_specialize field."""
    if direction == "bwd":
        return _backward_default(call), _backward_candidates(call)
    plain = [ForwardConfig(c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages) for c in configs_for(call)
             if not c.warp_specialize]
    d = default_config(call)
    return ForwardConfig(d.BLOCK_M, d.BLOCK_N, d.num_warps, d.num_stages), plain


_bwd_modules: dict = {}


def backward_module(spec: KernelSpec, interpret: bool):
    """The rendered TMA backward module of ``spec`` (memoized per spec)."""
    mod = _bwd_modules.get((spec, interpret))
    if mod is None:
        mod = _bwd_modules[(spec, interpret)] = render.load(BWD_TEMPLATE, dict(spec.render_params(), tma=True),
                                                           interpret=interpret)
    return mod


_bwd_plans = PlanCache()


def _make_bwd_plan(bcall: BackwardCall, config: Optional[BackwardConfig],
                   config_for: Optional[ConfigProvider]):
    call = bcall.forward
    spec = KernelSpec.for_call(call, bias_needs_grad=bcall.bias_needs_grad)
    interpret = call.q.device.type != "cuda"
    if config is None and config_for is not None:
        config = config_for(_query("bwd", spec, call))
    if config is not None and not isinstance(config, BackwardConfig):
        raise TypeError(f"fusepass: the sm_90 backward takes a BackwardConfig, got {config!r}")
    cfg = config if config is not None else backward_default_config(bcall, interpret=interpret)
    return backward.make_plan(bcall, spec, cfg, backward_module, family="_sm90")


def attention_backward(bcall: BackwardCall, config: Optional[BackwardConfig] = None,
                       config_for: Optional[ConfigProvider] = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dq, dk, dv (shapes and dtypes of q, k, v) and one gradient per bias (empty where not
    wanted): ``fusepass.kernels.backward.attention_backward``'s contract.  The caller checked
    ``backward_refusal(bcall)``."""
    call = bcall.forward
    if call.empty:
        return backward.empty_grads(bcall)
    plan = _bwd_plans.get(plan_key(call, bcall.signature, config, config_for),
                          lambda: _make_bwd_plan(bcall, config, config_for))
    launches_sm90["bwd"] += 1
    if not plan.interpret:
        ensure_allocator()
    return backward.run_plan(plan, bcall, strides=_tma_strides)


def backward_runner(bcall: BackwardCall, config_for: Optional[ConfigProvider] = None) -> Optional[Callable]:
    """As ``fusepass.kernels.backward.runner``, for the sm_90 backward: a later call whose data
    pointers are not TMA-aligned returns None (the caller then takes the full path)."""
    call = bcall.forward
    if call.empty:
        return None
    plan = _bwd_plans.get(plan_key(call, bcall.signature, None, config_for),
                          lambda: _make_bwd_plan(bcall, None, config_for))
    return backward.bind_plan(plan, bcall, _tma_strides, (launches_sm90,), admits=_backward_aligned,
                              before_launch=None if plan.interpret else ensure_allocator)


def _backward_aligned(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> bool:
    return aligned(q, k, v) and aligned(grad_out, out, q)


def fitted_backward_config(bcall: BackwardCall, config: Optional[BackwardConfig] = None,
                           config_for: Optional[ConfigProvider] = None) -> dict:
    """Per backward kernel the config it really launched with (fewer stages where the asked one
    did not fit), empty before the first launch: what benchmarks report."""
    call = bcall.forward
    plan = _bwd_plans.get(plan_key(call, bcall.signature, config, config_for),
                          lambda: _make_bwd_plan(bcall, config, config_for))
    return dict(plan.fitted)
