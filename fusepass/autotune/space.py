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

from .config import Arch, KernelConfig, why_pruned

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
    kept: list[KernelConfig] = []
    pruned: dict[str, int] = {}
    m_cap = _tile_cap(m_bucket) if m_bucket else None
    n_cap = _tile_cap(n_bucket) if n_bucket else None
    for cfg in space.grid():
        if m_cap is not None and cfg.BLOCK_M > m_cap:
            pruned["BLOCK_M > bucket"] = pruned.get("BLOCK_M > bucket", 0) + 1
            continue
        if n_cap is not None and cfg.BLOCK_N > n_cap:
            pruned["BLOCK_N > bucket"] = pruned.get("BLOCK_N > bucket", 0) + 1
            continue
        # Tiles far smaller than the bucket only pay for tiny sequences: keep them within 8x.
        # NOTE: a 16-row tile on a 4k sequence launches 256 programs per head and never wins
        # in FA2's measurements; this keeps the timed set near 20-40 configs.
        if m_bucket and cfg.BLOCK_M * 8 < min(m_bucket, 128 * 8) and cfg.BLOCK_M < 64:
            pruned["BLOCK_M << bucket"] = pruned.get("BLOCK_M << bucket", 0) + 1
            continue
        if n_bucket and cfg.BLOCK_N * 8 < min(n_bucket, 128 * 8) and cfg.BLOCK_N < 64:
            pruned["BLOCK_N << bucket"] = pruned.get("BLOCK_N << bucket", 0) + 1
            continue
        reason = why_pruned(cfg, arch, head_dim, dtype, value_head_dim=value_head_dim, direction=direction)
        if reason:
            pruned[reason] = pruned.get(reason, 0) + 1
            continue
        kept.append(cfg)
    log.debug(
        "search space %s %s d=%s dv=%s %s: %d kept, pruned %s",
        arch.name, dtype, head_dim, value_head_dim, direction, len(kept), pruned or "none",
    )
    return kept


def with_default(configs: Sequence[KernelConfig], default: KernelConfig | None) -> list[KernelConfig]:
    """The candidates with the heuristic default first, so it is always timed (and wins ties)."""
    out = list(configs)
    if default is not None:
        out = [default] + [c for c in out if c != default]
    return out
