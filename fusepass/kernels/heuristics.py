"""Default launch configs, and the query a config provider (the autotuner) is asked."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from fusepass.autotune.config import KernelConfig

from .spec import KernelSpec

log = logging.getLogger(__name__)


class LaunchArgs(NamedTuple):
    """A launch's arguments after q, k, v, by name (the launchers take them in this order)."""

    biases: Sequence[torch.Tensor]
    masks: Sequence[torch.Tensor]
    seed: Optional[torch.Tensor]
    scale: float
    softcap: float
    dropout_p: float
    mask_fill: float
    mask_expr: str
    mask_args: Sequence[int]


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
    # The launch's other arguments, so that a provider can time this very variant (mask
    # tensors, predicate arguments) on its own inputs.
    args: Optional[LaunchArgs] = dataclasses.field(default=None, compare=False, repr=False)
    # The compile's autotune option for this call (None: the process default, FUSEPASS_AUTOTUNE).
    autotune: Optional[bool] = None


# What a launcher may be given to pick its config (the autotuner's, passed by ops/dispatch):
# a config, or None for the heuristic default.  The kernels never import the tuner.
ConfigProvider = Callable[[ConfigQuery], Optional[KernelConfig]]


def arch_of(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def default_config(arch: Optional[tuple[int, int]], dtype: torch.dtype, head_dim: int, direction: str,
                   *, skipping: bool = False, kv_len: int = 4096) -> KernelConfig:
    """A config that compiles and runs well everywhere; ``arch`` None = interpreter.

    Forward: BLOCK_M query rows per program, BLOCK_N keys per step.  Backward: the dK/dV
    program owns BLOCK_N keys and steps over BLOCK_M queries; the dQ program owns BLOCK_N
    queries and steps over BLOCK_M keys.  ``skipping``: a block map skips tiles (causal-like);
    ``kv_len``: the key length (short sequences want smaller backward tiles: more programs).
    """
    if arch is None:
        # Interpreter: numpy cost is per tile op; small tiles keep the odd-size tests cheap.
        return KernelConfig(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        if direction == "fwd":
            return KernelConfig(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        return KernelConfig(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1)
    # NOTE: H200 bf16, B*N = 16k, N = 4k, TFLOP/s (benchmarks/sweep_configs.py, 2026-11-21):
    # fwd D=64: 128x64 w8 s3 426 (causal 354), 64x64 w4 s3 403 (causal 373), 128x128 w8 s3 349;
    # fwd D=128: 128x64 w8 s3 473 (causal 357), 128x128 w8 s3 470 (causal 388), 128x64 w4 s3 271;
    # bwd D=64: 64x128 w8 s1 279 (causal 261), 32x128 w4 s3 277, 64x64 w4 s3 253 (causal 262);
    # bwd D=128: 64x128 w8 s1 304 (causal 281), 64x128 w8 s2 300 (causal 294), 32x128 w4 s3 170.
    if direction == "fwd":
        if head_dim <= 64:
            if skipping:
                return KernelConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
            return KernelConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        if head_dim <= 128:
            return KernelConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
        return KernelConfig(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return KernelConfig(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1)
    # NOTE: bwd D=128 at N=1k: 64x64 w4 s2 283 (causal 239), 64x128 w8 s2 250 (causal 209).
    if head_dim <= 128 and kv_len <= 2048:
        return KernelConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return KernelConfig(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)
    return KernelConfig(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1)


def default_for(query: ConfigQuery) -> KernelConfig:
    """The heuristic config a launch runs with when no provider gives one."""
    return default_config(arch_of(query.device), query.dtype, max(query.spec.head_dim, query.spec.v_head_dim),
                          query.direction, skipping=query.spec.block_map, kv_len=query.kv_len)


def choose(query: ConfigQuery, explicit: Optional[KernelConfig],
           provider: Optional[ConfigProvider] = None) -> KernelConfig:
    """The launch's config: ``explicit``, else the provider's, else the heuristic default."""
    if explicit is not None:
        return explicit
    if provider is not None:
        cfg = provider(query)
        if cfg is not None:
            return cfg
    return default_for(query)
