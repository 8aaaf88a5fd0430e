"""Tile classification of a mask predicate by interval reasoning.

A tile is the block of scores with query rows i0..i1 and key columns j0..j1 (inclusive).  It is
EMPTY when no entry in it can be visible, FULL when no entry can be hidden, PARTIAL otherwise.
The reasoning is sound, not exact: each subexpression is bounded by an interval over the
tile, relations are decided only when the intervals settle them, and anything else is PARTIAL.

``block_map`` does this for every tile of an M x N score matrix at once, with numpy arrays of
tile bounds ([Tm, 1] rows against [1, Tn] columns): 128 x 128 tiles take well under a
millisecond per expression node.
"""

from __future__ import annotations

import enum
import functools
import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import sympy
import torch

from . import predicate

log = logging.getLogger(__name__)


class Tile(enum.IntEnum):
    EMPTY = 0
    PARTIAL = 1
    FULL = 2


Interval = tuple[np.ndarray, np.ndarray]          # (lo, hi), float64, may hold +-inf
Truth = tuple[np.ndarray, np.ndarray]             # (can_be_true, can_be_false)
_INF = np.inf


def _mul(a: Interval, b: Interval) -> Interval:
    with np.errstate(invalid="ignore"):
        ps = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    ps = [np.nan_to_num(p, nan=0.0, posinf=_INF, neginf=-_INF) for p in ps]  # 0 * inf = 0 here
    return functools.reduce(np.minimum, ps), functools.reduce(np.maximum, ps)


def _floordiv(a: Interval, b: Interval) -> Interval:
    blo, bhi = b
    if not (np.all(blo == bhi) and np.all(blo != 0)):
        return np.full_like(a[0], -_INF), np.full_like(a[0], _INF)
    lo, hi = np.floor(a[0] / blo), np.floor(a[1] / blo)
    return np.minimum(lo, hi), np.maximum(lo, hi)


def _mod(a: Interval, b: Interval) -> Interval:
    blo, bhi = b
    if not (np.all(blo == bhi) and np.all(blo > 0)):
        return np.full_like(a[0], -_INF), np.full_like(a[0], _INF)
    c = blo
    fin = np.isfinite(a[0]) & np.isfinite(a[1])
    same = fin & (np.floor(np.where(fin, a[0], 0) / c) == np.floor(np.where(fin, a[1], 0) / c))
    lo = np.where(same, np.mod(np.where(fin, a[0], 0), c), 0.0)
    hi = np.where(same, np.mod(np.where(fin, a[1], 0), c), c - 1)
    return lo, hi


def _abs(a: Interval) -> Interval:
    lo, hi = a
    alo = np.where(lo >= 0, lo, np.where(hi <= 0, -hi, 0.0))
    return alo, np.maximum(np.abs(lo), np.abs(hi))


def _compile_num(e: sympy.Basic) -> Callable[[dict], Interval]:
    if isinstance(e, sympy.Symbol):
        name = e.name
        return lambda env: env[name]
    if e.is_Integer:
        v = float(int(e))
        return lambda env: (np.float64(v), np.float64(v))
    if isinstance(e, sympy.Add):
        fs = [_compile_num(a) for a in e.args]

        def add(env):
            lo, hi = 0.0, 0.0
            for f in fs:
                a = f(env)
                lo, hi = lo + a[0], hi + a[1]
            return lo, hi

        return add
    if isinstance(e, sympy.Mul):
        fs = [_compile_num(a) for a in e.args]
        return lambda env: functools.reduce(_mul, (f(env) for f in fs))
    if isinstance(e, sympy.floor):
        num, den = e.args[0].as_numer_denom()
        fn, fd = _compile_num(sympy.expand(num)), _compile_num(den)
        return lambda env: _floordiv(fn(env), fd(env))
    if isinstance(e, sympy.Mod):
        fa, fb = _compile_num(e.args[0]), _compile_num(e.args[1])
        return lambda env: _mod(fa(env), fb(env))
    if isinstance(e, sympy.Abs):
        fa = _compile_num(e.args[0])
        return lambda env: _abs(fa(env))
    if isinstance(e, (sympy.Min, sympy.Max)):
        fs = [_compile_num(a) for a in e.args]
        red = np.minimum if isinstance(e, sympy.Min) else np.maximum

        def mm(env):
            vs = [f(env) for f in fs]
            return functools.reduce(red, [v[0] for v in vs]), functools.reduce(red, [v[1] for v in vs])

        return mm
    raise predicate.PredicateError(f"no interval rule for {type(e).__name__}")


def _compile_bool(e: sympy.Basic) -> Callable[[dict], Truth]:
    if e is sympy.true or e is sympy.false:
        t = e is sympy.true
        return lambda env: (np.bool_(t), np.bool_(not t))
    if isinstance(e, sympy.And) or isinstance(e, sympy.Or):
        fs = [_compile_bool(a) for a in e.args]
        is_and = isinstance(e, sympy.And)

        def andor(env):
            ts = [f(env) for f in fs]
            t = [x[0] for x in ts]
            f_ = [x[1] for x in ts]
            if is_and:
                return functools.reduce(np.logical_and, t), functools.reduce(np.logical_or, f_)
            return functools.reduce(np.logical_or, t), functools.reduce(np.logical_and, f_)

        return andor
    if isinstance(e, sympy.Not):
        f = _compile_bool(e.args[0])
        return lambda env: tuple(reversed(f(env)))
    if isinstance(e, sympy.Rel):
        # Compare d = lhs - rhs with 0: one interval, so a common term cancels exactly.
        fd = _compile_num(sympy.expand(e.lhs - e.rhs))
        kind = type(e)

        def rel(env):
            lo, hi = fd(env)
            if kind is sympy.Lt:
                return lo < 0, hi >= 0
            if kind is sympy.Le:
                return lo <= 0, hi > 0
            if kind is sympy.Gt:
                return hi > 0, lo <= 0
            if kind is sympy.Ge:
                return hi >= 0, lo < 0
            if kind is sympy.Eq:
                return (lo <= 0) & (hi >= 0), ~((lo == 0) & (hi == 0))
            return ~((lo == 0) & (hi == 0)), (lo <= 0) & (hi >= 0)   # Ne

        return rel
    raise predicate.PredicateError(f"no interval rule for {type(e).__name__}")


@functools.lru_cache(maxsize=256)
def _compiled(expr: str) -> Callable[[dict], Truth]:
    return _compile_bool(sympy.sympify(predicate.to_sympy(expr)) if expr else sympy.true)


def classify_tiles(expr: str, i0, i1, j0, j1, *, M: int, N: int, args: Sequence[int] = (),
                   B: Optional[int] = None, H: Optional[int] = None) -> np.ndarray:
    """Tile kinds (int8, values of ``Tile``) for tiles with inclusive bounds i0..i1, j0..j1
    (arrays that broadcast together).  b and h range over [0, B) / [0, H), unbounded if None."""
    env = {
        "i": (np.asarray(i0, dtype=np.float64), np.asarray(i1, dtype=np.float64)),
        "j": (np.asarray(j0, dtype=np.float64), np.asarray(j1, dtype=np.float64)),
        "M": (np.float64(M), np.float64(M)), "N": (np.float64(N), np.float64(N)),
        "b": (np.float64(0), np.float64(B - 1 if B else _INF)),
        "h": (np.float64(0), np.float64(H - 1 if H else _INF)),
    }
    env.update({f"a{k}": (np.float64(int(a)), np.float64(int(a))) for k, a in enumerate(args)})
    try:
        can_true, can_false = _compiled(expr)(env)
    except predicate.PredicateError as e:
        log.debug("tiles: %s; every tile is PARTIAL", e)
        shape = np.broadcast_shapes(np.shape(i0), np.shape(j0))
        return np.full(shape, Tile.PARTIAL, dtype=np.int8)
    shape = np.broadcast_shapes(np.shape(i0), np.shape(i1), np.shape(j0), np.shape(j1))
    can_true = np.broadcast_to(can_true, shape)
    can_false = np.broadcast_to(can_false, shape)
    out = np.full(shape, Tile.PARTIAL, dtype=np.int8)
    out[~can_true] = Tile.EMPTY
    out[~can_false & can_true] = Tile.FULL
    return out


def block_map(expr: str, M: int, N: int, block_m: int, block_n: int, args: Sequence[int] = (),
              *, B: Optional[int] = None, H: Optional[int] = None) -> torch.Tensor:
    """[ceil(M/block_m), ceil(N/block_n)] int8 tensor of ``Tile`` values for the whole matrix
    (one map for all b, h; the last tile row/column is clipped to M-1 / N-1)."""
    tm, tn = -(-M // block_m), -(-N // block_n)
    i0 = (np.arange(tm) * block_m)[:, None]
    j0 = (np.arange(tn) * block_n)[None, :]
    i1 = np.minimum(i0 + block_m - 1, M - 1)
    j1 = np.minimum(j0 + block_n - 1, N - 1)
    kinds = classify_tiles(expr, i0, i1, j0, j1, M=M, N=N, args=args, B=B, H=H)
    return torch.from_numpy(np.ascontiguousarray(kinds))


def skipped_fraction(expr: str, M: int, N: int, block_m: int = 128, block_n: int = 128,
                     args: Sequence[int] = (), **kw: Any) -> float:
    """The fraction of tiles that are EMPTY (skipped: no loads, no math)."""
    bm = block_map(expr, M, N, block_m, block_n, args, **kw)
    return float((bm == Tile.EMPTY).float().mean()) if bm.numel() else 0.0
