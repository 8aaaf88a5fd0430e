"""Tile classification of a mask predicate, for block skipping (FlexAttention-like).

A tile (query rows [r*BM, (r+1)*BM) x keys [c*BN, (c+1)*BN)) is *empty* when the predicate
hides every key of it, *full* when it shows every key (and all keys are < N), else *partial*.
Rows >= M are "don't care" (never stored).  The forward walks, per query tile, the list of
partial tiles (mask arithmetic) and then the list of full tiles (none); the dK/dV backward
walks the transposed lists per key tile.

Maps may be per (b, h): lists of shape [P, rows, cols] where map P = off_b * map_sb + off_h *
map_sh (0 strides where the map broadcasts).  Two sources are combined by the min of their
classes (EMPTY < PARTIAL < FULL: empty if either is empty, full only if both are full):

* the position predicate ``mask_expr`` (below: ``classify``, cached per shape; per (b, h)
  when it reads b or h);
* the bool ``masks`` of the op (data: padding, segment ids, arbitrary masks), classified on
  the device by ``templates/blockmap_data.py.jinja`` at every forward call, without a host
  sync; the classes are kept for the backward of the same call (``data_classes``).

The predicate is evaluated densely on the device, in row chunks, once per
(expr, args, M, N, BM, BN, device) and cached: the per-call cost is a dict lookup.  Building
needs no host sync, but it launches torch ops: under CUDA-graph capture the map must already
be cached (torch.compile's cudagraph trees run a warm-up call first, which builds it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import weakref
from typing import Optional, Sequence

import torch

from fusepass.masks.predicate import evaluate_torch
from fusepass.masks.tiles import Tile

from .launch_common import cdiv
from .predicate_triton import uses_names

log = logging.getLogger(__name__)

# The tile classes as plain ints (int8 tensors hold them): the one enum is masks.tiles.Tile.
EMPTY, PARTIAL, FULL = int(Tile.EMPTY), int(Tile.PARTIAL), int(Tile.FULL)
_CACHE_SIZE = 128
_cache: "collections.OrderedDict[tuple, BlockMap]" = collections.OrderedDict()
_lock = threading.Lock()
# Base granularity of data maps: the forward classifies masks in tiles of at most this size,
# and the backward's maps are unions of those tiles when its block sizes are multiples.
DATA_GRANULE = 64
# Column tiles per program of the mask classification kernel.
_DATA_COLS = 8


@dataclasses.dataclass(frozen=True)
class TileLists:
    """Per row tile: the column tiles of one kind, ascending, padded; [P, n_rows, n_cols] int32
    (or [n_rows, n_cols] for one map).  Map index of (b, h): b * map_sb + h * map_sh."""

    partial_idx: torch.Tensor
    partial_cnt: torch.Tensor  # [P, n_rows] int32
    full_idx: torch.Tensor
    full_cnt: torch.Tensor
    map_sb: int = 0
    map_sh: int = 0

    @property
    def stride(self) -> int:
        return self.partial_idx.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.partial_idx.shape[-2]

    def kernel_args(self) -> list:
        """MAP_PIDX, MAP_PCNT, MAP_FIDX, MAP_FCNT, stride_map, map_rows, map_sb, map_sh."""
        return [self.partial_idx, self.partial_cnt, self.full_idx, self.full_cnt, self.stride, self.n_rows,
                self.map_sb, self.map_sh]

    def visited(self) -> int:
        """How many tiles a kernel walking these lists visits (a host sync: tests/debug only)."""
        return int(self.partial_cnt.sum().item() + self.full_cnt.sum().item())


NO_MAP_ARGS = [None, None, None, None, 0, 0, 0, 0]


@dataclasses.dataclass(frozen=True)
class BlockMap:
    classes: torch.Tensor  # [n_row_tiles, n_col_tiles] int8: EMPTY / PARTIAL / FULL
    by_row: TileLists  # per query tile: key tiles (forward, dQ)
    by_col: TileLists  # per key tile: query tiles (dK/dV)


def classify(expr: str, args, M: int, N: int, bm: int, bn: int, device, B: int = 1, H: int = 1) -> torch.Tensor:
    """[n_r, n_c] int8 classes of a predicate that reads neither b nor h; else [B', H', n_r, n_c]
    with B' = B if it reads b (else 1), H' likewise: one map per (b, h)."""
    n_r, n_c = cdiv(M, bm), cdiv(N, bn)
    names = uses_names(expr)
    Bx = B if "b" in names else 1
    Hx = H if "h" in names else 1
    per_bh = Bx * Hx > 1 or bool({"b", "h"} & names)
    out = torch.empty((Bx, Hx, n_r, n_c), dtype=torch.int8, device=device)
    # Rows per chunk: keep the dense chunk near 16M elements.
    step = max(1, (1 << 24) // max(1, Bx * Hx * bm * n_c * bn))
    j = torch.arange(n_c * bn, device=device).view(1, 1, 1, -1)
    b = torch.arange(Bx, device=device).view(-1, 1, 1, 1) if "b" in names else 0
    h = torch.arange(Hx, device=device).view(1, -1, 1, 1) if "h" in names else 0
    env = {f"a{k}": int(a) for k, a in enumerate(args)}
    for r0 in range(0, n_r, step):
        r1 = min(n_r, r0 + step)
        i = torch.arange(r0 * bm, r1 * bm, device=device).view(1, 1, -1, 1)
        keep = torch.as_tensor(evaluate_torch(expr, b=b, h=h, i=i, j=j, M=M, N=N, **env), device=device)
        keep = keep.expand(Bx, Hx, i.shape[2], j.shape[3]) & (j < N)
        valid = i < M
        shape = (Bx, Hx, r1 - r0, bm, n_c, bn)
        any_ = (keep & valid).view(shape).any(5).any(3)
        all_ = (keep | ~valid).view(shape).all(5).all(3)
        out[:, :, r0:r1] = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    return out if per_bh else out[0, 0]


def _lists(classes: torch.Tensor) -> TileLists:
    """Lists of ``classes`` [R, C] or [Bx, Hx, R, C] (per (b, h) maps; sizes 1 broadcast)."""
    map_sb = map_sh = 0
    if classes.dim() == 4:
        Bx, Hx = classes.shape[:2]
        map_sb, map_sh = (Hx if Bx > 1 else 0), (1 if Hx > 1 else 0)
        classes = classes.reshape(Bx * Hx, *classes.shape[2:])

    def compact(kind):
        flags = classes == kind
        # Stable sort puts the True columns first, in ascending order.
        idx = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return idx.contiguous(), flags.sum(-1, dtype=torch.int32)

    p_idx, p_cnt = compact(PARTIAL)
    f_idx, f_cnt = compact(FULL)
    return TileLists(p_idx, p_cnt, f_idx, f_cnt, map_sb, map_sh)


def _transpose(classes: torch.Tensor) -> torch.Tensor:
    return classes.transpose(-1, -2).contiguous()


def get(expr: str, args, M: int, N: int, bm: int, bn: int, device, B: int = 1, H: int = 1) -> BlockMap:
    """The predicate's map, cached per (expr, args, M, N, bm, bn, device) (and B, H if it reads
    b or h).  ``classes`` is [n_r, n_c], or [B', H', n_r, n_c] per (b, h)."""
    names = uses_names(expr)
    bh = (B if "b" in names else 1, H if "h" in names else 1)
    key = (expr, tuple(int(a) for a in args), int(M), int(N), bm, bn, str(torch.device(device)), bh)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    classes = classify(expr, args, M, N, bm, bn, device, B, H)
    bmap = BlockMap(classes, _lists(classes), _lists(_transpose(classes)))
    with _lock:
        _cache[key] = bmap
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    log.debug("block map for %r M=%d N=%d tiles %dx%d built", expr, M, N, bm, bn)
    return bmap


# ---------------------------------------------------------------------------------------------
# Data maps: tile classes of the op's bool masks, computed on the device.


def _as4d(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a 4-D view [Bm, Hm, Mm, Nm] where every broadcast dim (size 1 or stride 0)
    has size 1: the classifier then reads each distinct element once."""
    m = mask[(None,) * (4 - mask.dim())] if mask.dim() < 4 else mask
    for d in range(4):
        if m.shape[d] > 1 and m.stride(d) == 0:
            m = m.narrow(d, 0, 1)
    return m


@functools.lru_cache(maxsize=2)
def _data_module(interpret: bool):
    from . import render

    return render.load("blockmap_data.py.jinja", {}, interpret=interpret)


def mask_classes(mask: torch.Tensor, M: int, N: int, gr: int, gc: int, words: bool = True) -> torch.Tensor:
    """Classes of one bool mask (broadcastable to [B, H, M, N]) in tiles of gr x gc:
    [Bm, Hm, cdiv(M, gr), cdiv(N, gc)] int8, an expanded view along broadcast dims.  Rows >= M
    and keys >= N are don't-care here (``finish`` caps ragged key tiles).  One kernel launch,
    no host sync; reads each distinct mask element once."""
    from . import render

    m = _as4d(mask)
    Bm, Hm, Mm, Nm = m.shape
    n_rt, n_ct = cdiv(Mm, gr), cdiv(Nm, gc)
    out = torch.empty((Bm * Hm, n_rt, n_ct), dtype=torch.int8, device=mask.device)
    if out.numel():
        interpret = mask.device.type != "cuda"
        mod = _data_module(interpret)
        grid = (n_rt, cdiv(n_ct, _DATA_COLS), Bm * Hm)
        u8 = m.view(torch.uint8)
        src = None
        if words and Nm % 4 == 0 and gc % 4 == 0:
            try:
                # Four keys per int32 load: a quarter of the loads, same bytes.
                src = u8.view(torch.int32)
            except RuntimeError:  # keys not contiguous, or unaligned
                src = None
        if src is not None:
            strides, n_cols, g_cols = list(src.stride()), Nm // 4, gc // 4
        else:
            src, strides, n_cols, g_cols = u8, list(u8.stride()), Nm, gc
        import contextlib

        with render.interpreting() if interpret else contextlib.nullcontext():
            mod.mask_tile_classes[grid](
                src, out, *strides, Hm, Mm, n_cols, n_rt, n_ct, GR=gr, GC=g_cols, COLS=_DATA_COLS,
                WORDS=src.dtype == torch.int32, num_warps=4,
            )
    return out.view(Bm, Hm, n_rt, n_ct).expand(Bm, Hm, cdiv(M, gr), cdiv(N, gc))


def coarsen(classes: torch.Tensor, fr: int, fc: int) -> torch.Tensor:
    """Classes [..., R, C] of small tiles -> classes of tiles fr x fc times larger (a large tile
    is empty when all its small ones are, full when all are; tiles past the end are
    don't-care).  With EMPTY < PARTIAL < FULL: min(max, PARTIAL) + (min == FULL)."""
    if fr == 1 and fc == 1:
        return classes
    *lead, R, C = classes.shape
    R2, C2 = cdiv(R, fr), cdiv(C, fc)
    hi = lo = classes
    if R2 * fr != R or C2 * fc != C:
        pad = (0, C2 * fc - C, 0, R2 * fr - R)
        # Don't-care padding: EMPTY for the max (visibility), FULL for the min (fullness).
        hi = torch.nn.functional.pad(classes, pad, value=EMPTY)
        lo = torch.nn.functional.pad(classes, pad, value=FULL)
    hi = hi.reshape(*lead, R2, fr, C2, fc).amax(dim=(-3, -1))
    lo = lo.reshape(*lead, R2, fr, C2, fc).amin(dim=(-3, -1))
    return (hi.clamp(max=PARTIAL) + (lo == FULL).to(torch.int8)).to(torch.int8)


def _key(masks: Sequence[torch.Tensor], M: int, N: int) -> tuple:
    return (int(M), int(N)) + tuple(
        (m.data_ptr(), str(m.device), tuple(m.shape), tuple(m.stride()), m._version) for m in masks)


# key -> (gr, gc, classes): the masks' classes of the last forward, kept while the masks live.
_data_cache: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_DATA_CACHE_SIZE = 256
stats = collections.Counter()  # "computed" / "reused": for tests


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _forget(key) -> None:
    with _lock:
        _data_cache.pop(key, None)


def data_classes(masks: Sequence[torch.Tensor], M: int, N: int, gr: int, gc: int, *,
                 store: bool = False) -> Optional[torch.Tensor]:
    """AND of ``masks`` as tile classes [Bx, Hx, cdiv(M, gr), cdiv(N, gc)] (int8), or None.

    ``store`` (the forward): compute at granularity gr x gc and keep the result for the
    backward of the same call, keyed by the masks' addresses, shapes, strides and versions;
    the entry is dropped when a mask's tensor object dies, so a key can never describe other
    data.  Otherwise (the backward): reuse a kept entry whose granularity divides gr x gc
    (unions of its tiles), else compute.  Under CUDA-graph capture nothing is kept or reused
    (a replay would not run the Python bookkeeping)."""
    if not masks:
        return None
    device = masks[0].device
    capturing = _capturing(device)
    key = None if capturing else _key(masks, M, N)
    if not store and key is not None:
        with _lock:
            hit = _data_cache.get(key)
        if hit is not None and gr % hit[0] == 0 and gc % hit[1] == 0:
            stats["reused"] += 1
            return coarsen(hit[2], gr // hit[0], gc // hit[1])
    stats["computed"] += 1
    classes = functools.reduce(torch.minimum, [mask_classes(m, M, N, gr, gc) for m in masks])
    if store and key is not None:
        with _lock:
            new = key not in _data_cache
            _data_cache[key] = (gr, gc, classes)
            _data_cache.move_to_end(key)
            while len(_data_cache) > _DATA_CACHE_SIZE:
                _data_cache.popitem(last=False)
        if new:
            for m in masks:
                weakref.finalize(m, _forget, key)
    return classes


def granule(bm: int, bn: int) -> int:
    """The data-map granularity a forward with bm x bn tiles classifies masks at."""
    return min(DATA_GRANULE, bm, bn)


def call_lists(expr: str, args, masks: Sequence[torch.Tensor], B: int, H: int, M: int, N: int,
               bm: int, bn: int, device, *, by: str, data: Optional[torch.Tensor] = None) -> TileLists:
    """The tile lists one launch walks, for tiles of bm query rows x bn keys: ``by="row"`` per
    query tile (forward, dQ), ``by="col"`` per key tile (dK/dV).  ``data``: the masks' classes
    at bm x bn (``data_classes``); None computes them.  Predicate-only calls are served from
    the per-shape cache."""
    if not masks:
        bmap = get(expr, args, M, N, bm, bn, device, B, H)
        return bmap.by_row if by == "row" else bmap.by_col
    if data is None:
        data = data_classes(masks, M, N, bm, bn)
    classes = data
    if expr:
        pred = get(expr, args, M, N, bm, bn, device, B, H).classes
        classes = torch.minimum(classes, pred)
    if N % bn:
        # Keys past N: a ragged key tile is never full (full tiles load without bounds).
        classes = classes.clone() if classes is data else classes.contiguous()
        classes[..., -1].clamp_(max=PARTIAL)
    classes = classes.contiguous()
    return _lists(classes if by == "row" else _transpose(classes))
