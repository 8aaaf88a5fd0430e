"""Search spaces per architecture, pruned before anything is timed.

Every candidate costs a Triton compile (about a second) plus its timing, so the spaces are
small grids around what FlashAttention-2 and the Triton tutorial use, cut down further by
the sequence-length bucket (no tile taller than the bucket) and the pruning predicates of
:mod:`fusepass.autotune.config`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Sequence

from .config import Arch, KernelConfig, shared_memory_bytes, why_pruned

log = logging.getLogger(__name__)

# Triton's tl.dot needs every tile dimension to be at least 16.
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    block_m: tuple[int, ...]
    block_n: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]
    warp_specialize: tuple[bool, ...] = (False,)

    def grid(self) -> list[KernelConfig]:
        return [
            KernelConfig(bm, bn, w, s, ws)
            for bm, bn, w, s, ws in itertools.product(
                self.block_m, self.block_n, self.num_warps, self.num_stages, self.warp_specialize
            )
        ]


# sm80 class (A100, A10, L4, RTX 30xx/40xx): FA2's tiles; deep pipelines rarely pay there.
SM80_SPACE = SearchSpace(
    block_m=(16, 32, 64, 128),
    block_n=(16, 32, 64, 128),
    num_warps=(4, 8),
    num_stages=(1, 2, 3),
)
# sm90 (H100, H200): larger tiles and deeper pipelines feed wgmma; warp specialization only
# when the template says it supports it (see ``space_for``).
SM90_SPACE = SearchSpace(
    block_m=(16, 32, 64, 128),
    block_n=(16, 32, 64, 128),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)


def space_for(arch: Arch, *, warp_specialize: bool = False) -> SearchSpace:
    """The space for an architecture; ``warp_specialize=True`` when the template can use it."""
    if arch.major >= 9:
        if warp_specialize and arch.has_warp_specialization:
            return dataclasses.replace(SM90_SPACE, warp_specialize=(False, True))
        return SM90_SPACE
    return SM80_SPACE


def _tile_cap(bucket: int) -> int:
    """The tallest useful tile for a length bucket: a tile taller than the sequence is wasted."""
    return max(MIN_BLOCK, bucket)


def candidates(
    arch: Arch,
    head_dim: int,
    dtype: Any,
    *,
    value_head_dim: int | None = None,
    direction: str = "fwd",
    m_bucket: int | None = None,
    n_bucket: int | None = None,
    warp_specialize: bool = False,
    space: SearchSpace | None = None,
) -> list[KernelConfig]:
    """Configs worth timing, in the space's order (the order breaks ties between equal times).

    Tiles taller than the query bucket or wider than the key bucket are dropped (they only
    add masked work) unless that would leave no tile size at all.
    """
    space = space or space_for(arch, warp_specialize=warp_specialize)
    grid = space.grid()
    kept, pruned = _prune(grid, arch, head_dim, dtype, value_head_dim, direction, m_bucket, n_bucket)
    if not kept:  # the tile-size rules left nothing (large head dims): keep what fits at all
        kept, pruned = _prune(grid, arch, head_dim, dtype, value_head_dim, direction, None, None)
    if not kept:  # nothing fits by estimate: the smallest config, so that timing decides
        kept = [min(grid, key=lambda c: (shared_memory_bytes(c, head_dim, dtype, value_head_dim=value_head_dim,
                                                             direction=direction), -c.num_warps))]
    log.debug(
        "search space %s %s d=%s dv=%s %s: %d kept, pruned %s",
        arch.name, dtype, head_dim, value_head_dim, direction, len(kept), pruned or "none",
    )
    return kept


def _prune(grid, arch, head_dim, dtype, value_head_dim, direction, m_bucket, n_bucket):
    kept: list[KernelConfig] = []
    pruned: dict[str, int] = {}

    def drop(reason: str) -> None:
        pruned[reason] = pruned.get(reason, 0) + 1

    m_cap = _tile_cap(m_bucket) if m_bucket else None
    n_cap = _tile_cap(n_bucket) if n_bucket else None
    for cfg in grid:
        if m_cap is not None and cfg.BLOCK_M > m_cap:
            drop("BLOCK_M > bucket")
            continue
        if n_cap is not None and cfg.BLOCK_N > n_cap:
            drop("BLOCK_N > bucket")
            continue
        # Tiles far smaller than the bucket only pay for tiny sequences: keep them within 8x.
        # NOTE: a 16-row tile on a 4k sequence launches 256 programs per head and never wins
        # in FA2's measurements; this keeps the timed set near 10-40 configs.
        if m_bucket and cfg.BLOCK_M < 64 and cfg.BLOCK_M * 8 < min(m_bucket, 1024):
            drop("BLOCK_M << bucket")
            continue
        if n_bucket and cfg.BLOCK_N < 64 and cfg.BLOCK_N * 8 < min(n_bucket, 1024):
            drop("BLOCK_N << bucket")
            continue
        reason = why_pruned(cfg, arch, head_dim, dtype, value_head_dim=value_head_dim, direction=direction)
        if reason:
            drop(reason)
            continue
        kept.append(cfg)
    return kept, pruned


def with_default(configs: Sequence[KernelConfig], default: KernelConfig | None) -> list[KernelConfig]:
    """The candidates with the heuristic default first, so it is always timed (and wins ties)."""
    out = list(configs)
    if default is not None:
        out = [default] + [c for c in out if c != default]
    return out
