"""The autotuner's config provider for the kernel launchers (``fusepass.kernels.heuristics``):
one function from a launch's query (shape, variant, the call's own arguments) to a config.

``kernel_config_provider`` returns None (the launcher's heuristic default) when autotuning is
off (the call's ``autotune`` run option, else ``FUSEPASS_AUTOTUNE``), on a non-CUDA device (the
interpreter, CPU), or while a CUDA graph is being captured; otherwise it looks the key up
(memory, then the cache file) and tunes on a miss, timing candidates on the call's own inputs.
Repeated calls for a known shape cost one dict lookup.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from typing import Any, Sequence

import torch
from torch import Tensor

from ..options import Options, resolve_options
from . import space
from .config import LaunchConfig, arch_for, config_type
from .key import TuneKey, bucket
from .tuner import BenchFn, Runner, Tuner, default_tuner
from ..kernels.backward import attention_backward
from ..kernels.forward import attention_forward
from ..call import AttentionCall, BackwardCall
from ..kernels import heuristics, sm90
from ..kernels.heuristics import ConfigQuery

log = logging.getLogger(__name__)

_options: Options | None = None
# Device types whose launches are timed; others get the default config (tests add "cpu" to
# drive the whole path through Triton's interpreter).
TIMED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
_fast: dict[tuple, LaunchConfig] = {}
_fast_lock = threading.Lock()


def configure(options: Options | None) -> None:
    """Set the process default for launches whose call carries no autotune option (a direct
    call of the op; compiled calls carry their compile's).  ``None`` goes back to the
    environment (``FUSEPASS_AUTOTUNE``)."""
    global _options
    _options = options
    with _fast_lock:
        _fast.clear()


def current_options() -> Options:
    global _options
    if _options is None:
        _options = resolve_options()
    return _options


def autotune_enabled(options: Options | None = None) -> bool:
    """The process default for launches whose call carries no autotune option."""
    return bool((options or current_options()).autotune)


@functools.lru_cache(maxsize=None)
def device_info(index: int) -> tuple[str, tuple[int, int], int | None]:
    """(name, compute capability, opt-in shared memory per block or None) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    return props.name, (props.major, props.minor), (int(smem) if smem else None)


def attention_flops(direction: str, shape: Sequence[tuple[str, int]], density: float = 1.0) -> float:
    """FLOPs of one call: forward 2*B*Hq*M*N*(D + Dv) (= 4*B*H*M*N*D when Dv = D) times the
    visible fraction ``density`` (0.5 for causal); backward 2.5x forward (fwd+bwd = 3.5x)."""
    s = dict(shape)
    fwd = 2.0 * s["B"] * s["Hq"] * s["M"] * s["N"] * (s["D"] + s["Dv"]) * density
    return fwd if direction == "fwd" else 2.5 * fwd


def compile_workers() -> int:
    """Threads a cold key's candidates first run (and so compile) on: ``FUSEPASS_COMPILE_WORKERS``,
    0 or 1 for one at a time; by default up to 8, one per CPU."""
    text = os.environ.get("FUSEPASS_COMPILE_WORKERS", "").strip()
    if text:
        try:
            return max(0, int(text))
        except ValueError:
            log.warning("fusepass autotune: FUSEPASS_COMPILE_WORKERS=%r is not an integer; ignored", text)
    return min(8, os.cpu_count() or 1)


# -- the launchers' config provider (passed to them by fusepass.ops.dispatch) ----------------

def template_hash() -> str:
    """The templates' hash (owned by ``fusepass.kernels.render``): any edit to a template
    makes old tuned configs stale."""
    from ..kernels import render

    return render.template_hash()


def feature_signature(spec: Any) -> str:
    """The mask/feature signature of a ``fusepass.kernels.spec.KernelSpec``: its structural
    fields that differ from the defaults, head dims left out (they are key fields of their own)."""
    import dataclasses

    parts = []
    for f in dataclasses.fields(spec):
        if f.name in ("head_dim", "v_head_dim"):
            continue
        value = getattr(spec, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            parts.append(f.name)
        elif isinstance(value, tuple):
            parts.append(f"{f.name}={'/'.join(map(str, value))}")
        else:
            parts.append(f"{f.name}={value}")
    return ",".join(parts)


def _timed_call(query: ConfigQuery, q: Tensor, k: Tensor, v: Tensor) -> AttentionCall | None:
    """The call to time on random q, k, v: the query's own call's other arguments when it has
    one, else made up: broadcast [1, 1, M, N] biases and all-true masks.  None when they cannot
    be made up (a predicate with runtime arguments: their values decide which tiles run)."""
    own = query.call
    if own is not None:
        return AttentionCall.build(q, k, v, own.biases, own.masks, own.seed, scale=own.scale, softcap=own.softcap,
                                   dropout_p=own.dropout_p, mask_fill=own.mask_fill, mask_expr=own.mask_expr,
                                   mask_args=own.mask_args)
    spec = query.spec
    if spec.n_args:
        return None
    M, N = query.q_len, query.kv_len
    modes = tuple(spec.bias_grad) or ("",) * spec.n_biases
    # A bias whose gradient the kernel stores elementwise has the full shape; others broadcast.
    shapes = [(query.batch, query.q_heads, M, N) if mode == "store" else (1, 1, M, N) for mode in modes]
    with torch.no_grad():
        biases = [torch.randn(*shape, dtype=q.dtype, device=q.device) for shape in shapes]
        masks = [torch.ones(1, 1, M, N, dtype=torch.bool, device=q.device) for _ in range(spec.n_masks)]
    seed = torch.tensor(1234, dtype=torch.int64, device=q.device) if spec.dropout else None
    fill = torch.finfo(q.dtype).min if spec.finite_fill else float("-inf")
    return AttentionCall.build(q, k, v, biases, masks, seed, scale=spec.head_dim ** -0.5,
                               softcap=30.0 if spec.softcap else 0.0, dropout_p=0.1 if spec.dropout else 0.0,
                               mask_fill=fill, mask_expr=spec.expr)


# What times a candidate, by (ConfigQuery.family, direction).
_LAUNCHERS = {("", "fwd"): attention_forward, ("", "bwd"): attention_backward,
              (sm90.FAMILY, "fwd"): sm90.attention_forward, (sm90.FAMILY, "bwd"): sm90.attention_backward}


def _kernel_bench_fn(query: ConfigQuery) -> BenchFn | None:
    """``bench_fn`` that calls the kernel launcher with an explicit config on random q, k, v of
    the query's shape (and the call's own other arguments when the query has one)."""
    B, Hq, Hkv, M, N = query.batch, query.q_heads, query.kv_heads, query.q_len, query.kv_len
    D, Dv = query.spec.head_dim, query.spec.v_head_dim
    device, dtype = query.device, query.dtype
    state: dict[str, Any] = {}

    def timed() -> AttentionCall | BackwardCall:
        if not state:
            with torch.no_grad():
                q = torch.randn(B, Hq, M, D, dtype=dtype, device=device)
                k = torch.randn(B, Hkv, N, D, dtype=dtype, device=device)
                v = torch.randn(B, Hkv, N, Dv, dtype=dtype, device=device)
            call = _timed_call(query, q, k, v)
            if query.direction == "bwd":
                with torch.no_grad():
                    dout = torch.randn(B, Hq, M, Dv, dtype=dtype, device=device)
                    out = torch.randn(B, Hq, M, Dv, dtype=dtype, device=device)
                    lse = torch.randn(B, Hq, M, dtype=torch.float32, device=device) + math.log(max(1, N))
                grads = tuple(bool(m) for m in query.spec.bias_grad)
                call = BackwardCall.build(call, dout, out, lse, grads)
            state["call"] = call
        return state["call"]

    launcher = _LAUNCHERS[query.family, query.direction]

    def bench(cfg: LaunchConfig) -> Runner:
        return functools.partial(launcher, timed(), config=cfg)

    return bench


def query_key(query: ConfigQuery) -> TuneKey:
    """The tune key of one launch (``fusepass.kernels.heuristics.ConfigQuery``) on a CUDA device."""
    spec = query.spec
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    name, capability, _ = device_info(index)
    features = ",".join(f for f in (feature_signature(spec), query.family and f"family={query.family}") if f)
    return TuneKey.build(
        gpu=name, capability=capability, template_hash=template_hash(), dtype=query.dtype,
        head_dim=spec.head_dim, value_head_dim=spec.v_head_dim, seq_q=query.q_len, seq_k=query.kv_len,
        direction=query.direction, features=features,
        gqa_group=max(1, query.q_heads // max(1, query.kv_heads)),
    )


def kernel_config_provider(query: ConfigQuery) -> LaunchConfig | None:
    """``fusepass.kernels.heuristics.ConfigProvider``: the tuned config for one launch, or None
    (the launcher then uses ``heuristics.default_config``) when autotuning is off, the device is
    not CUDA, a CUDA graph is being captured, or the call cannot be timed."""
    wanted = query.autotune if query.autotune is not None else autotune_enabled()
    if not wanted or query.device.type not in TIMED_DEVICE_TYPES:
        return None
    fast = ("hook", query.direction, query.family, query.device.index, query.dtype, query.spec,
            query.q_heads // max(1, query.kv_heads), bucket(query.q_len), bucket(query.kv_len))
    cfg = _fast.get(fast)
    if cfg is not None:
        return cfg
    if torch.cuda.is_current_stream_capturing():
        return None
    spec = query.spec
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    name, capability, smem = device_info(index)
    key = query_key(query)
    tuner = default_tuner()
    entry = tuner.lookup(key)
    if entry is not None and not isinstance(entry.config, config_type(query.direction)):
        log.warning("fusepass autotune: cache entry %s holds a %s; ignored", key.describe(), type(entry.config).__name__)
        entry = None
    if entry is not None:
        cfg = entry.config
    else:
        if query.call is None and spec.n_args:
            log.debug("fusepass autotune: cannot time %s without the call's mask arguments; default config",
                      key.describe())
            return None
        # The config the launch would run without us (block-map and length aware): the baseline
        # the tuned config must beat, timed with the candidates.
        if query.family == sm90.FAMILY and query.call is None:
            return None  # its space is read from the call (kernels/sm90.tuning_space)
        bench_fn = _kernel_bench_fn(query)
        if query.family == sm90.FAMILY:
            default, cands = sm90.tuning_space(query.direction, query.call)
        else:
            default = heuristics.default_for(query)
            arch = arch_for(capability, smem)
            cands = space.candidates(
                arch, key.head_dim, key.dtype, value_head_dim=key.value_head_dim, direction=key.direction,
                m_bucket=key.m_bucket, n_bucket=key.n_bucket,
            )
        shape = (("B", query.batch), ("Hq", query.q_heads), ("Hkv", query.kv_heads), ("M", query.q_len),
                 ("N", query.kv_len), ("D", spec.head_dim), ("Dv", spec.v_head_dim))
        # First runs on threads on CUDA only: the interpreter (tests tune through it) patches
        # module globals while it runs, so its launches must not overlap.
        cuda = query.device.type == "cuda"
        with torch.cuda.device(index):
            cfg = tuner.tune(key, space.with_default(cands, default), bench_fn, default=default, shape=shape,
                             flops=attention_flops(query.direction, shape),  # dense FLOPs, masked or not
                             compile_workers=compile_workers() if cuda else 0,
                             worker_setup=functools.partial(torch.cuda.set_device, index) if cuda else None)
    with _fast_lock:
        _fast[fast] = cfg
    return cfg
