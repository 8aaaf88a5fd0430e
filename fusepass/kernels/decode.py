"""Decode launcher: templates/attention_decode.py.jinja -> ``attn_decode_split`` + ``attn_decode_combine``,
or ``attn_decode_single`` when the keys take one split.

For short queries against long keys (decoding: one new query per sequence against a KV
cache) the prefill grid has B * Hq programs of mostly empty query tiles, each reading the
whole cache.  Here the G query heads of one key/value head and their M positions are packed
as the rows of one tile, so K and V are read once per key/value head, and the keys are split
over ``num_splits`` programs whose partial results are merged exactly by a second kernel.
``refusal`` is the rule that picks this family (docs/architecture.md); the op's semantics
are the prefill kernel's, so its backward is the prefill backward.  Tiles are classified in
the kernel (see the template), so nothing per call depends on the cache length on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from fusepass.autotune.config import DecodeConfig
from fusepass.call import AttentionCall, out_strides, out_tensor

from . import render
from .launch_common import (PlanCache, cdiv, extra_args, head_dims, launches, new_output, plan_key, scalar_args,
                            spec_module)
from .launcher import Launcher
from .limits import next_pow2
from .spec import KernelSpec

# The family serves queries of at most MAX_QUERY_LEN positions whose packed rows (query heads
# per key/value head x positions) fit one tile of MAX_PACKED_ROWS, against at least
# MIN_KV_LEN keys.  NOTE: H200, bf16, B=8, Hq=32, Hkv=8, D=128, M=1..16 (bench_decode, both
# families called directly, host cost included): the prefill kernel wins at N <= 1024 (61-83
# against 49-141 us), the decode family from N = 4096 on (87-138 against 182-185 us; at 16k
# 234-366 against 668-671).  Two launches cost ~100 us of host time there: under CUDA graphs
# the crossover would be lower.  Below MIN_KV_LEN the family still serves a call whose key
# length differs from the previous call of the same structure (a growing cache, decode step
# after decode step): the prefill launcher re-plans for every new length (its block map:
# 6 ms per call against this family's 0.14 ms, measured on CPU with the launches stubbed out),
# this family plans once per structure.
MAX_QUERY_LEN = 16
MAX_PACKED_ROWS = 64
MIN_KV_LEN = 4096
# Under CUDA-graph capture (mode="reduce-overhead") a call's host time is paid once, when it is
# captured, and only its GPU time repeats.  NOTE: H200, bf16, Hq=32, Hkv=8, D=128 (bench_decode.py
# --families-only, CUDA-graph replay; RESULTS.md, eighth session): the decode family's GPU time
# is below the prefill kernel's at every B in {1, 8}, M in {1, 4, 16} from N = 1024 on (1.2-2.3x
# there, 3.0-3.6x at 4096); at N <= 512 the prefill kernel wins B=1 M=16 by 2-3 us.
MIN_KV_LEN_CAPTURED = 1024
# With many (batch, key/value head) pairs the prefill grid is large and each of its programs
# still reads its head's whole cache.  NOTE: same table, back to back with the host's time: at
# B=8, Hkv=8 (64 pairs) the decode family is faster at every N from 256 (M = 1, 4, 16: 15.9-20.2
# against 25.0-26.4 us at 256, 37.7 against 102.4 at 2048); at B=1 (8 pairs) the prefill kernel
# is, up to N = 2048.  Pair counts in between were not measured and keep MIN_KV_LEN.
MANY_PAIRS = 64
MIN_KV_LEN_MANY_PAIRS = 256


def kv_floor(pairs: int, captured: bool = False) -> int:
    """The fewest keys for which the decode family serves a call that is not a decode step."""
    if pairs >= MANY_PAIRS:
        return MIN_KV_LEN_MANY_PAIRS
    return MIN_KV_LEN_CAPTURED if captured else MIN_KV_LEN
# Splits: about one program per SM, or two when there are few (batch, key/value head) pairs,
# each program walking at least MIN_TILES_PER_SPLIT tiles.  NOTE: benchmarks/sweep_decode.py on
# the H200 (bf16, M=1, Hq=32, D=128; RESULTS.md, 2026-12-02 fourth session): one program per SM
# was the fastest split count at 64 to 256 pairs (B=8 Hkv=8 N=4k-32k: 3 splits, 5% under the
# 5 that two per SM gave; B=32 Hkv=8 and B=8 Hkv=32: 1 split, 9-11% under 2), two per SM at 8
# pairs (B=1 N=128k: 33 splits, 1% from the best; one per SM, 17 splits, was slower).
PROGRAMS_PER_SM = 1
FEW_PAIRS = 16  # below this many pairs, PROGRAMS_PER_SM_FEW_PAIRS
PROGRAMS_PER_SM_FEW_PAIRS = 2
MIN_TILES_PER_SPLIT = 4


def packed_rows(call: AttentionCall) -> int:
    """Rows of the packed query tile: the query heads of one key/value head times the positions."""
    return call.groups * call.q_len


# Per structure: the key length and mask arguments of its first call, or MOVED once a call had
# others (bounded: cleared when full).
_last_step: dict = {}
_LAST_MAX = 1024
MOVED = "moved"


def _growing(call: AttentionCall) -> bool:
    """Whether calls of ``call``'s structure have had more than one key length or set of mask
    arguments (a predicate's cache position): decode steps, of a growing cache or of a static
    one whose position moves.  Once true it stays true, because the layers of one model make
    calls of one structure at each step (the same length L times, then the next length)."""
    key = call.structure
    first = _last_step.get(key)
    if first is MOVED:
        return True
    step = (call.kv_len, call.mask_args)
    if first is None:
        if len(_last_step) >= _LAST_MAX:
            _last_step.clear()
        _last_step[key] = step
        return False
    if first == step:
        return False
    _last_step[key] = MOVED
    return True


def moved(call: AttentionCall) -> bool:
    """Whether ``call``'s structure is known to take decode steps (``_growing``, read only)."""
    return _last_step.get(call.structure) is MOVED


def capturing(q: Tensor) -> bool:
    """Whether ``q``'s call is being captured into a CUDA graph (its host time is then paid once)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


# Signatures whose decode kernels ran outside a capture (bounded).  A kernel Triton has not yet
# loaded cannot be loaded while a stream captures (cuModuleLoadData is not permitted then), so a
# captured call takes the decode family only when an uncaptured call of its signature ran it
# first: the first uncaptured call of a signature between the two floors runs the decode family
# (later ones the prefill kernel, cheaper on the host), and that is the call a capture's warm-up
# makes (mode="reduce-overhead" runs each graph once before recording it).
_ran_uncaptured: dict = {}


def captured_serves(call: AttentionCall) -> bool:
    """Whether ``call`` is captured and its signature's decode kernels are loaded."""
    return capturing(call.q) and call.signature in _ran_uncaptured


def _warm_up(call: AttentionCall) -> bool:
    """Record that ``call``'s signature runs the decode family now, outside a capture, if it
    never did: True the first time."""
    if call.signature in _ran_uncaptured:
        return False
    if len(_ran_uncaptured) >= _LAST_MAX:
        _ran_uncaptured.clear()
    _ran_uncaptured[call.signature] = True
    return True


def serves(call: AttentionCall) -> bool:
    """Whether the decode family serves ``call`` (``refusal(call) is None``, without building
    the reason: this runs on every call)."""
    M = call.q_len
    if M > MAX_QUERY_LEN or call.groups * M > MAX_PACKED_ROWS or call.dropout_p > 0:
        return False
    # Long caches first: they are served whatever the previous length was, without the
    # structure key and its dict (host time a decode step pays per layer).
    N, pairs = call.kv_len, call.batch * call.kv_heads
    if N >= kv_floor(pairs):
        return True
    if N >= kv_floor(pairs, captured=True):
        if capturing(call.q):
            if call.signature in _ran_uncaptured:
                return True
        elif _warm_up(call):
            return True
    return _growing(call)


def refusal(call: AttentionCall) -> Optional[str]:
    """None when the decode family serves ``call``, else why the prefill kernel runs it."""
    if serves(call):
        return None
    return size_refusal(call, captured=captured_serves(call))


def size_refusal(call: AttentionCall, *, growing: bool = False, captured: bool = False) -> Optional[str]:
    """``refusal_for`` on ``call``'s sizes."""
    return refusal_for(call.q_len, call.groups, call.kv_len, call.dropout_p, pairs=call.batch * call.kv_heads,
                       growing=growing, captured=captured)


def refusal_for(q_len: int, groups: int, kv_len: int, dropout_p: float, *, pairs: int, growing: bool = False,
                captured: bool = False) -> Optional[str]:
    """The rule on sizes alone (explain reads it at compile time, where ``growing`` and
    ``captured`` are unknown).  ``captured``: captured, with the decode kernels loaded."""
    if q_len > MAX_QUERY_LEN:
        return f"query length {q_len} > {MAX_QUERY_LEN}"
    if groups * q_len > MAX_PACKED_ROWS:
        return f"{groups} query heads per key/value head x {q_len} positions > {MAX_PACKED_ROWS} rows"
    floor = kv_floor(pairs, captured)
    if kv_len < floor and not growing:
        lower = kv_floor(pairs, captured=True)
        return (f"key length {kv_len} < {floor}" + (f" ({lower} under CUDA graphs)" if lower < floor else "")
                + ", and not a growing cache")
    if dropout_p > 0:
        return "dropout (training)"
    return None


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(call: AttentionCall) -> DecodeConfig:
    """BLOCK_N keys per step and the split count from the shape and the number of SMs."""
    block_n = 32 if call.q.device.type != "cuda" else (64 if max(call.head_dim, call.v_head_dim) > 128 else 128)
    return DecodeConfig(BLOCK_N=block_n, num_splits=_wanted_splits(call), num_warps=4, num_stages=2)


def _wanted_splits(call: AttentionCall) -> int:
    """Splits per (batch, key/value head) that fill the GPU with about PROGRAMS_PER_SM programs
    per SM (PROGRAMS_PER_SM_FEW_PAIRS below FEW_PAIRS pairs)."""
    pairs = call.batch * call.kv_heads
    per_sm = PROGRAMS_PER_SM_FEW_PAIRS if pairs < FEW_PAIRS else PROGRAMS_PER_SM
    return cdiv(per_sm * _sm_count(call.q.device), pairs)


def splits_for(kv_len: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(splits, tiles per split) for ``kv_len`` keys: at most cfg.num_splits, each walking at
    least MIN_TILES_PER_SPLIT tiles when there are enough, none empty."""
    n_tiles = cdiv(kv_len, cfg.BLOCK_N)
    splits = max(1, min(cfg.num_splits, n_tiles // MIN_TILES_PER_SPLIT or 1))
    per_split = cdiv(n_tiles, splits)
    return cdiv(n_tiles, per_split), per_split


@dataclasses.dataclass
class _Plan:
    """What does not depend on the cache length (it grows by one key per decode step)."""

    spec: KernelSpec
    cfg: DecodeConfig  # num_splits: the most a launch may use
    block_m: int
    consts: dict
    interpret: bool
    launch_split: Launcher  # the rendered kernels' launchers
    launch_combine: Launcher
    launch_single: Launcher  # one split: the split's walk and the combine's epilogue in one launch
    scalars: tuple  # the kernels' scalar tail when it does not depend on the key length, else ()


_plans = PlanCache()


def kernel_module(spec: KernelSpec, interpret: bool):
    return spec_module("attention_decode.py.jinja", spec, interpret)


def _make_plan(call: AttentionCall, config: Optional[DecodeConfig]) -> _Plan:
    spec = KernelSpec.for_call(call)
    cfg = config or default_config(call)
    interpret = call.q.device.type != "cuda"
    mod = kernel_module(spec, interpret)
    block_m = max(16, next_pow2(packed_rows(call)))
    consts = dict(head_dims(spec), BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N)
    # Only a finite fill's lse (fill + log N) reads the key length.
    scalars = () if spec.finite_fill else tuple(scalar_args(spec, call.scale, call.softcap, call.dropout_p,
                                                                call.mask_fill, call.kv_len))
    direct = not interpret
    return _Plan(spec, cfg, block_m, consts, interpret,
                 Launcher(mod.attn_decode_split, consts, cfg.num_warps, cfg.num_stages, direct=direct),
                 Launcher(mod.attn_decode_combine, consts, cfg.num_warps, 1, direct=direct),
                 Launcher(mod.attn_decode_single, consts, cfg.num_warps, cfg.num_stages, direct=direct), scalars)


def attention_forward(call: AttentionCall, config: Optional[DecodeConfig] = None) -> tuple[Tensor, Tensor]:
    """out [B, Hq, M, Dv] (v's dtype), lse [B, Hq, M] fp32: the op's semantics, as the prefill
    kernel computes them (``refusal(call)`` must be None)."""
    plan = _plans.get(plan_key(call, call.structure, config), lambda: _make_plan(call, config))
    return _launch(plan, _Launch.of(call, plan), call.q, call.k, call.v, call.biases, call.masks, call.seed)


def runner(call: AttentionCall) -> Optional[Callable]:
    """A function of (q, k, v, biases, masks, seed) for later calls of ``call``'s signature:
    the split count, strides and scalars bound once (see kernels/forward.runner)."""
    plan = _plans.get(plan_key(call, call.structure, None), lambda: _make_plan(call, None))
    return None if plan.interpret else functools.partial(_launch, plan, _Launch.of(call, plan))


def grower(call: AttentionCall) -> Callable:
    """A function of (q, k, v, biases, masks, seed, mask_args) for later calls of ``call``'s
    structure whose key length (and the strides that follow from it) or mask arguments differ:
    a cache's next steps.  The plan is bound once; each call only computes its length's splits,
    strides and scalars (the kernels classify tiles from the mask arguments themselves).  The
    caller guarantees that such a call would validate as ``call`` did (ops/dispatch.growth_key)."""
    plan = _plans.get(plan_key(call, call.structure, None), lambda: _make_plan(call, None))
    fixed = _Fixed.of(call)
    last = [((), None)]  # the last step's (lengths, strides, mask arguments) and its _Launch

    def run(q, k, v, biases, masks, seed, mask_args):
        # The layers of a model make one step's calls with the same lengths and arguments: the
        # step's launch arguments (and their tail's key in the launcher) are built once.
        step = (k.shape[2], k.stride(), v.stride(), mask_args)
        seen, at = last[0]
        if step != seen:
            at = _Launch.at(plan, fixed, q, k, v, tuple(mask_args))
            last[0] = (step, at)
        return _launch(plan, at, q, k, v, biases, masks, seed)

    return run


class _Fixed(NamedTuple):
    """What a structure's launches read besides the tensors' key length and strides and the mask
    arguments."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    groups: int
    v_head_dim: int
    scale: float
    softcap: float
    dropout_p: float
    mask_fill: float

    @classmethod
    def of(cls, call: AttentionCall) -> "_Fixed":
        return cls(call.batch, call.q_heads, call.kv_heads, call.q_len, call.groups, call.v_head_dim, call.scale,
                   call.softcap, call.dropout_p, call.mask_fill)


class _Launch(NamedTuple):
    """What one key length's launches take besides the tensors (a tuple: it is built on every
    decode step of a growing cache, where a frozen dataclass's __init__ costs microseconds)."""

    tail: tuple
    per_split: int
    split_grid: tuple
    combine_grid: tuple
    out_shape: tuple
    out_strides: tuple
    parts_numel: int
    mask_args: tuple  # as ints, the kernels' last arguments

    @classmethod
    def of(cls, call: AttentionCall, plan: _Plan) -> "_Launch":
        return cls.at(plan, _Fixed.of(call), call.q, call.k, call.v, call.mask_args)

    @classmethod
    def at(cls, plan: _Plan, f: _Fixed, q: Tensor, k: Tensor, v: Tensor, mask_args: tuple) -> "_Launch":
        N = k.shape[2]
        splits, per_split = splits_for(N, plan.cfg)
        scalars = plan.scalars or scalar_args(plan.spec, f.scale, f.softcap, f.dropout_p, f.mask_fill, N)
        B, Hq, Hkv, M, Dv = f.batch, f.q_heads, f.kv_heads, f.q_len, f.v_head_dim
        # The splits' partial results in one allocation (host time per decode step): accumulators
        # [B * Hkv, splits, BLOCK_M, Dv_p], then row max / sum [B * Hkv, splits, 2, BLOCK_M].
        return cls((*q.stride(), *k.stride(), *v.stride(), Hq, f.groups, M, N, Hkv, splits, *scalars), per_split,
                   (splits, B * Hkv), (B * Hkv,), (B, Hq, M, Dv), out_strides(B, Hq, M, Dv),
                   B * Hkv * splits * plan.block_m * (plan.consts["HEAD_DIM_V_P"] + 2), tuple([int(a) for a in mask_args]))


def _launch(plan: _Plan, at: _Launch, q, k, v, biases, masks, seed) -> tuple[Tensor, Tensor]:
    out = out_tensor(new_output, *at.out_shape, dtype=v.dtype, device=q.device)
    lse = new_output(at.out_shape[:3], torch.float32, q.device)
    extras = extra_args(biases, masks, at.mask_args) if biases or masks else at.mask_args
    launches["decode"] += 1
    with render.interpreting() if plan.interpret else contextlib.nullcontext():
        if at.split_grid[0] == 1:  # one split (a short cache, or as many pairs as programs): no merge
            plan.launch_single(at.combine_grid, q, k, v, out, lse, *at.out_strides, *extras, tail=at.tail)
            return out, lse
        parts = torch.empty(at.parts_numel, dtype=torch.float32, device=q.device)
        plan.launch_split(at.split_grid, q, k, v, parts, at.per_split, *extras, tail=at.tail)
        plan.launch_combine(at.combine_grid, q, k, v, out, lse, parts, *at.out_strides, *extras, tail=at.tail)
    return out, lse
