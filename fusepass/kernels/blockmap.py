"""Tile classification of a mask predicate, for block skipping (FlexAttention-like).

A tile (query rows [r*BM, (r+1)*BM) x keys [c*BN, (c+1)*BN)) is *empty* when the predicate
hides every key of it, *full* when it shows every key (and all keys are < N), else *partial*.
Rows >= M are "don't care" (never stored).  The forward walks, per query tile, the list of
partial tiles (mask arithmetic) and then the list of full tiles (none); the dK/dV backward
walks the transposed lists per key tile.

The predicate is evaluated densely on the device, in row chunks, once per
(expr, args, M, N, BM, BN, device) and cached: the per-call cost is a dict lookup.  Building
needs no host sync, but it launches torch ops: under CUDA-graph capture the map must already
be cached (torch.compile's cudagraph trees run a warm-up call first, which builds it).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import torch

from fusepass.masks.predicate import evaluate_torch

log = logging.getLogger(__name__)

EMPTY, PARTIAL, FULL = 0, 1, 2
_CACHE_SIZE = 128
_cache: "collections.OrderedDict[tuple, BlockMap]" = collections.OrderedDict()
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class TileLists:
    """Per row tile: the column tiles of one kind, ascending, padded; [n_rows, n_cols] int32."""

    partial_idx: torch.Tensor
    partial_cnt: torch.Tensor  # [n_rows] int32
    full_idx: torch.Tensor
    full_cnt: torch.Tensor

    @property
    def stride(self) -> int:
        return self.partial_idx.shape[1]

    def visited(self) -> int:
        """How many tiles a kernel walking these lists visits (a host sync: tests/debug only)."""
        return int(self.partial_cnt.sum().item() + self.full_cnt.sum().item())


@dataclasses.dataclass(frozen=True)
class BlockMap:
    classes: torch.Tensor  # [n_row_tiles, n_col_tiles] int8: EMPTY / PARTIAL / FULL
    by_row: TileLists  # per query tile: key tiles (forward, dQ)
    by_col: TileLists  # per key tile: query tiles (dK/dV)


def classify(expr: str, args, M: int, N: int, bm: int, bn: int, device) -> torch.Tensor:
    n_r, n_c = -(-M // bm), -(-N // bn)
    out = torch.empty((n_r, n_c), dtype=torch.int8, device=device)
    # Rows per chunk: keep the dense chunk near 16M elements.
    step = max(1, (1 << 24) // max(1, bm * n_c * bn))
    j = torch.arange(n_c * bn, device=device).view(1, -1)
    env = {f"a{k}": int(a) for k, a in enumerate(args)}
    for r0 in range(0, n_r, step):
        r1 = min(n_r, r0 + step)
        i = torch.arange(r0 * bm, r1 * bm, device=device).view(-1, 1)
        keep = torch.as_tensor(evaluate_torch(expr, b=0, h=0, i=i, j=j, M=M, N=N, **env), device=device)
        keep = keep.expand(i.shape[0], j.shape[1]) & (j < N)
        valid = i < M
        shape = (r1 - r0, bm, n_c, bn)
        any_ = (keep & valid).view(shape).any(3).any(1)
        all_ = (keep | ~valid).view(shape).all(3).all(1)
        out[r0:r1] = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    return out


def _lists(classes: torch.Tensor) -> TileLists:
    def compact(kind):
        flags = classes == kind
        # Stable sort puts the True columns first, in ascending order.
        idx = torch.sort((~flags).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
        return idx.contiguous(), flags.sum(1).to(torch.int32)

    p_idx, p_cnt = compact(PARTIAL)
    f_idx, f_cnt = compact(FULL)
    return TileLists(p_idx, p_cnt, f_idx, f_cnt)


def get(expr: str, args, M: int, N: int, bm: int, bn: int, device) -> BlockMap:
    key = (expr, tuple(int(a) for a in args), int(M), int(N), bm, bn, str(torch.device(device)))
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    classes = classify(expr, args, M, N, bm, bn, device)
    bmap = BlockMap(classes, _lists(classes), _lists(classes.t().contiguous()))
    with _lock:
        _cache[key] = bmap
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    log.debug("block map for %r M=%d N=%d tiles %dx%d built", expr, M, N, bm, bn)
    return bmap
