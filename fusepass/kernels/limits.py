"""The kernels' limits as plain numbers, without torch: what the matcher, the kernels and the
autotuner (whose cache must load without torch) all read from this one place."""

from __future__ import annotations

import math

from fusepass.masks.fills import FINITE_FILL_LIMIT  # noqa: F401  (re-exported: the kernels' limit)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def padded_head_dim(d: int) -> int:
    return max(16, next_pow2(d))


# The narrowest V / output tile the kernels use (see value_tile_dim).
MIN_VALUE_TILE = 64


def value_tile_dim(head_dim: int, v_head_dim: int) -> int:
    """Width of the kernels' V / output tiles: Dv padded, at least MIN_VALUE_TILE, and never
    narrower than the Q / K tiles (D padded).

    NOTE: on the H200 with triton 3.6 (benchmarks/RESULTS.md, 2026-12-02), fp16/bf16
    launches whose V tile was narrower than the K tile (D=40..128 with Dv=16 or 17: V tiles
    of 16 or 32 beside K tiles of 64 or 128) gave outputs off by up to 10 (logsumexp right)
    or illegal memory accesses, depending on the config, and one program with 32-wide K and
    V tiles (D=Dv=17) was off by 1.4; no launch with V tiles of 64 or more was wrong.  The
    cause is not known; padding V costs at most the work of the Q.K product again, and only
    at head dims below 64 or unequal ones.
    """
    return max(padded_head_dim(v_head_dim), padded_head_dim(head_dim), MIN_VALUE_TILE)
