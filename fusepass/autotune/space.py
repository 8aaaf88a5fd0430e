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

from .config import Arch, LaunchConfig, config_type, shared_memory_bytes, why_pruned

log = logging.getLogger(__name__)

# Triton's tl.dot needs every tile dimension to be at least 16.
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Tile sizes by what they tile: query rows and keys (forward: BLOCK_M x BLOCK_N; backward:
    the dK/dV kernel's BLOCK_STEP queries x BLOCK_OWN keys)."""

    query_tiles: tuple[int, ...]
    key_tiles: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]

    def grid(self, direction: str = "fwd") -> list[LaunchConfig]:
        cls = config_type(direction)
        out = []
        for qt, kt, w, s in itertools.product(self.query_tiles, self.key_tiles, self.num_warps, self.num_stages):
            tiles = dict(BLOCK_M=qt, BLOCK_N=kt) if direction == "fwd" else dict(BLOCK_OWN=kt, BLOCK_STEP=qt)
            out.append(cls(**tiles, num_warps=w, num_stages=s))
        return out


# sm80 class (A100, A10, L4, RTX 30xx/40xx): FA2's tiles; deep pipelines rarely pay there.
SM80_SPACE = SearchSpace(
    query_tiles=(16, 32, 64, 128),
    key_tiles=(16, 32, 64, 128),
    num_warps=(4, 8),
    num_stages=(1, 2, 3),
)
# sm90 (H100, H200): deeper pipelines feed wgmma.
SM90_SPACE = SearchSpace(
    query_tiles=(16, 32, 64, 128),
    key_tiles=(16, 32, 64, 128),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)


def space_for(arch: Arch) -> SearchSpace:
    """The space for an architecture."""
    return SM90_SPACE if arch.major >= 9 else SM80_SPACE


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
    space: SearchSpace | None = None,
) -> list[LaunchConfig]:
    """Configs worth timing, in the space's order (the order breaks ties between equal times).

    Tiles taller than the query bucket or wider than the key bucket are dropped (they only
    add masked work) unless that would leave no tile size at all.
    """
    space = space or space_for(arch)
    grid = space.grid(direction)
    kept, pruned = _prune(grid, arch, head_dim, dtype, value_head_dim, m_bucket, n_bucket)
    if not kept:  # the tile-size rules left nothing (large head dims): keep what fits at all
        kept, pruned = _prune(grid, arch, head_dim, dtype, value_head_dim, None, None)
    if not kept:  # nothing fits by estimate: the smallest config, so that timing decides
        kept = [min(grid, key=lambda c: (shared_memory_bytes(c, head_dim, dtype, value_head_dim=value_head_dim),
                                          -c.num_warps))]
    log.debug(
        "search space %s %s d=%s dv=%s %s: %d kept, pruned %s",
        arch.name, dtype, head_dim, value_head_dim, direction, len(kept), pruned or "none",
    )
    return kept


def _prune(grid, arch, head_dim, dtype, value_head_dim, m_bucket, n_bucket):
    kept: list[LaunchConfig] = []
    pruned: dict[str, int] = {}

    def drop(reason: str) -> None:
        pruned[reason] = pruned.get(reason, 0) + 1

    m_cap = _tile_cap(m_bucket) if m_bucket else None
    n_cap = _tile_cap(n_bucket) if n_bucket else None
    for cfg in grid:
        if m_cap is not None and cfg.query_tile > m_cap:
            drop("query tile > bucket")
            continue
        if n_cap is not None and cfg.key_tile > n_cap:
            drop("key tile > bucket")
            continue
        # Tiles far smaller than the bucket only pay for tiny sequences: keep them within 8x.
        # NOTE: a 16-row tile on a 4k sequence launches 256 programs per head and never wins
        # in FA2's measurements; this keeps the timed set near 10-40 configs.
        if m_bucket and cfg.query_tile < 64 and cfg.query_tile * 8 < min(m_bucket, 1024):
            drop("query tile << bucket")
            continue
        if n_bucket and cfg.key_tile < 64 and cfg.key_tile * 8 < min(n_bucket, 1024):
            drop("key tile << bucket")
            continue
        reason = why_pruned(cfg, arch, head_dim, dtype, value_head_dim=value_head_dim)
        if reason:
            drop(reason)
            continue
        kept.append(cfg)
    return kept, pruned


def with_default(configs: Sequence[LaunchConfig], default: LaunchConfig | None) -> list[LaunchConfig]:
    """The candidates with the heuristic default first, so it is always timed (and wins ties)."""
    out = list(configs)
    if default is not None:
        out = [default] + [c for c in out if c != default]
    return out
