"""Default launch configs, and the query a config provider (the autotuner) is asked."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch

from fusepass.autotune.config import BackwardConfig, ForwardConfig, LaunchConfig
from fusepass.call import AttentionCall

from .spec import KernelSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConfigQuery:
    """What a config provider is asked: one launch's shape and features."""

    direction: str  # "fwd" or "bwd"
    spec: KernelSpec
    dtype: torch.dtype
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    device: torch.device
    # The call itself, so that a provider can time this very variant (mask tensors, predicate
    # arguments) on its own inputs.
    call: Optional[AttentionCall] = dataclasses.field(default=None, compare=False, repr=False)
    # The compile's autotune option for this call (None: the process default, FUSEPASS_AUTOTUNE).
    autotune: Optional[bool] = None
    # Which kernels the config is for: "" the FA2 family, "sm90" the Hopper one (its own search
    # space and cache entries: kernels/sm90.tuning_space).
    family: str = ""


# What a launcher may be given to pick its config (the autotuner's, passed by ops/dispatch):
# a config, or None for the heuristic default.  The kernels never import the tuner.
ConfigProvider = Callable[[ConfigQuery], Optional[LaunchConfig]]


def arch_of(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def default_config(arch: Optional[tuple[int, int]], dtype: torch.dtype, head_dim: int, direction: str,
                   *, skipping: bool = False, kv_len: int = 4096) -> LaunchConfig:
    """A config that compiles and runs well everywhere; ``arch`` None = interpreter.

    Forward: BLOCK_M query rows per program, BLOCK_N keys per step.  Backward: the dK/dV
    program owns BLOCK_OWN keys and steps over BLOCK_STEP queries; the dQ program owns
    BLOCK_OWN queries and steps over BLOCK_STEP keys.  ``skipping``: a block map skips tiles (causal-like);
    ``kv_len``: the key length (short sequences want smaller backward tiles: more programs).
    """
    fwd = direction == "fwd"
    if arch is None:
        # Interpreter: numpy cost is per tile op; small tiles keep the odd-size tests cheap.
        return ForwardConfig(32, 32, 4, 1) if fwd else BackwardConfig(32, 32, 4, 1)
    if dtype == torch.float32:
        return ForwardConfig(64, 32, 4, 2) if fwd else BackwardConfig(BLOCK_OWN=64, BLOCK_STEP=16, num_warps=4,
                                                                       num_stages=1)
    # NOTE: H200 bf16, B*N = 16k, N = 4k, TFLOP/s (benchmarks/sweep_configs.py, 2026-11-21):
    # fwd D=64: 128x64 w8 s3 426 (causal 354), 64x64 w4 s3 403 (causal 373), 128x128 w8 s3 349;
    # fwd D=128: 128x64 w8 s3 473 (causal 357), 128x128 w8 s3 470 (causal 388), 128x64 w4 s3 271;
    # bwd D=64: own 128 step 64 w8 s1 279 (causal 261), own 128 step 32 w4 s3 277, own 64 step 64
    # w4 s3 253 (causal 262); bwd D=128: own 128 step 64 w8 s1 304 (causal 281), w8 s2 300
    # (causal 294), own 128 step 32 w4 s3 170.
    if fwd:
        if head_dim <= 64:
            if skipping:
                return ForwardConfig(64, 64, 4, 3)
            return ForwardConfig(128, 64, 8, 3)
        if head_dim <= 128:
            return ForwardConfig(128, 128, 8, 3)
        return ForwardConfig(64, 32, 8, 2)
    if head_dim <= 64:
        return BackwardConfig(BLOCK_OWN=128, BLOCK_STEP=64, num_warps=8, num_stages=1)
    # NOTE: bwd D=128 at N=1k: own 64 step 64 w4 s2 283 (causal 239), own 128 step 64 w8 s2 250 (causal 209).
    if head_dim <= 128 and kv_len <= 2048:
        return BackwardConfig(BLOCK_OWN=64, BLOCK_STEP=64, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return BackwardConfig(BLOCK_OWN=128, BLOCK_STEP=64, num_warps=8, num_stages=2)
    return BackwardConfig(BLOCK_OWN=64, BLOCK_STEP=16, num_warps=8, num_stages=1)


def default_for(query: ConfigQuery) -> LaunchConfig:
    """The heuristic config a launch runs with when no provider gives one."""
    return default_config(arch_of(query.device), query.dtype, max(query.spec.head_dim, query.spec.v_head_dim),
                          query.direction, skipping=query.spec.block_map, kv_len=query.kv_len)


def choose(query: ConfigQuery, explicit: Optional[LaunchConfig],
           provider: Optional[ConfigProvider] = None) -> LaunchConfig:
    """The launch's config: ``explicit``, else the provider's, else the heuristic default."""
    want = ForwardConfig if query.direction == "fwd" else BackwardConfig
    if explicit is not None:
        if not isinstance(explicit, want):
            raise TypeError(f"fusepass: a {query.direction} launch takes a {want.__name__}, got {explicit!r}")
        return explicit
    if provider is not None:
        cfg = provider(query)
        if cfg is not None:
            return cfg
    return default_for(query)
