"""Tile classification of a mask predicate by interval reasoning.

A tile is the block of scores with query rows i0..i1 and key columns j0..j1 (inclusive).  It is
EMPTY when no entry in it can be visible, FULL when no entry can be hidden, PARTIAL otherwise.
The reasoning is sound, not exact: each subexpression is bounded by an interval over the
tile, relations are decided only when the intervals settle them, and anything else is PARTIAL.

``block_map`` does this for every tile of an M x N score matrix at once, with float64 CPU
tensors of tile bounds ([Tm, 1] rows against [1, Tn] columns; +-inf for unbounded b, h):
128 x 128 tiles take well under a millisecond per expression node.  Torch, not numpy: numpy
is not a dependency of the package.
"""

from __future__ import annotations

import enum
import functools
import logging
from typing import Any, Callable, Optional, Sequence

import sympy
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import predicate

log = logging.getLogger(__name__)


class Tile(enum.IntEnum):
    EMPTY = 0
    PARTIAL = 1
    FULL = 2


Interval = tuple[torch.Tensor, torch.Tensor]      # (lo, hi), float64 on the CPU, may hold +-inf
Truth = tuple[torch.Tensor, torch.Tensor]         # (can_be_true, can_be_false), bool
_INF = float("inf")
_CPU = torch.device("cpu")


def _const(v) -> torch.Tensor:
    """A 0-d float64 CPU tensor (it broadcasts against the [Tm, 1] / [1, Tn] tile bounds)."""
    return torch.tensor(float(v), dtype=torch.float64, device=_CPU)


def _unbounded(like: torch.Tensor) -> Interval:
    return torch.full_like(like, -_INF), torch.full_like(like, _INF)


def _mul(a: Interval, b: Interval) -> Interval:
    ps = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    ps = [torch.nan_to_num(p, nan=0.0, posinf=_INF, neginf=-_INF) for p in ps]  # 0 * inf = 0 here
    return functools.reduce(torch.minimum, ps), functools.reduce(torch.maximum, ps)


def _floordiv(a: Interval, b: Interval) -> Interval:
    blo, bhi = b
    if not bool(torch.all(blo == bhi) & torch.all(blo != 0)):
        return _unbounded(a[0])
    lo, hi = torch.floor(a[0] / blo), torch.floor(a[1] / blo)
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def _mod(a: Interval, b: Interval) -> Interval:
    blo, bhi = b
    if not bool(torch.all(blo == bhi) & torch.all(blo > 0)):
        return _unbounded(a[0])
    c = blo
    fin = torch.isfinite(a[0]) & torch.isfinite(a[1])
    lo0, hi0 = torch.where(fin, a[0], 0.0), torch.where(fin, a[1], 0.0)
    same = fin & (torch.floor(lo0 / c) == torch.floor(hi0 / c))
    # torch.remainder takes the divisor's sign, like Python's % and numpy's mod.
    lo = torch.where(same, torch.remainder(lo0, c), 0.0)
    hi = torch.where(same, torch.remainder(hi0, c), c - 1)
    return lo, hi


def _abs(a: Interval) -> Interval:
    lo, hi = a
    alo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, 0.0))
    return alo, torch.maximum(lo.abs(), hi.abs())


def _compile_num(e: sympy.Basic) -> Callable[[dict], Interval]:
    if isinstance(e, sympy.Symbol):
        name = e.name
        return lambda env: env[name]
    if e.is_Integer:
        v = float(int(e))
        return lambda env: (_const(v), _const(v))
    if isinstance(e, sympy.Add):
        fs = [_compile_num(a) for a in e.args]

        def add(env):
            lo, hi = fs[0](env)
            for f in fs[1:]:
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
        red = torch.minimum if isinstance(e, sympy.Min) else torch.maximum

        def mm(env):
            vs = [f(env) for f in fs]
            return functools.reduce(red, [v[0] for v in vs]), functools.reduce(red, [v[1] for v in vs])

        return mm
    raise predicate.PredicateError(f"no interval rule for {type(e).__name__}")


def _compile_bool(e: sympy.Basic) -> Callable[[dict], Truth]:
    if e is sympy.true or e is sympy.false:
        t = e is sympy.true
        return lambda env: (torch.tensor(t, device=_CPU), torch.tensor(not t, device=_CPU))
    if isinstance(e, sympy.And) or isinstance(e, sympy.Or):
        fs = [_compile_bool(a) for a in e.args]
        is_and = isinstance(e, sympy.And)

        def andor(env):
            ts = [f(env) for f in fs]
            t = [x[0] for x in ts]
            f_ = [x[1] for x in ts]
            if is_and:
                return functools.reduce(torch.logical_and, t), functools.reduce(torch.logical_or, f_)
            return functools.reduce(torch.logical_or, t), functools.reduce(torch.logical_and, f_)

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


def _bound(x) -> torch.Tensor:
    """Tile bounds as float64 CPU tensors: ints, sequences, tensors and numpy arrays all do."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=_CPU, dtype=torch.float64)
    return torch.as_tensor(x, dtype=torch.float64, device=_CPU)


def classify_tiles(expr: str, i0, i1, j0, j1, *, M: int, N: int, args: Sequence[int] = (),
                   B: Optional[int] = None, H: Optional[int] = None) -> torch.Tensor:
    """Tile kinds (int8 CPU tensor, values of ``Tile``) for tiles with inclusive bounds i0..i1,
    j0..j1 (tensors, arrays or ints that broadcast together).  b and h range over [0, B) / [0, H),
    unbounded if None."""
    # Host-side bookkeeping: real CPU tensors even if a fake mode is active (backend compile).
    with unset_fake_temporarily():
        i0, i1, j0, j1 = (_bound(x) for x in (i0, i1, j0, j1))
        env = {
            "i": (i0, i1), "j": (j0, j1),
            "M": (_const(M), _const(M)), "N": (_const(N), _const(N)),
            "b": (_const(0), _const(B - 1 if B else _INF)),
            "h": (_const(0), _const(H - 1 if H else _INF)),
        }
        env.update({f"a{k}": (_const(int(a)), _const(int(a))) for k, a in enumerate(args)})
        shape = torch.broadcast_shapes(i0.shape, i1.shape, j0.shape, j1.shape)
        try:
            can_true, can_false = _compiled(expr)(env)
        except predicate.PredicateError as e:
            log.debug("tiles: %s; every tile is PARTIAL", e)
            return torch.full(shape, int(Tile.PARTIAL), dtype=torch.int8, device=_CPU)
        can_true = can_true.broadcast_to(shape)
        can_false = can_false.broadcast_to(shape)
        out = torch.where(can_true, torch.where(can_false, int(Tile.PARTIAL), int(Tile.FULL)), int(Tile.EMPTY))
        return out.to(torch.int8)


def block_map(expr: str, M: int, N: int, block_m: int, block_n: int, args: Sequence[int] = (),
              *, B: Optional[int] = None, H: Optional[int] = None) -> torch.Tensor:
    """[ceil(M/block_m), ceil(N/block_n)] int8 CPU tensor of ``Tile`` values for the whole matrix
    (one map for all b, h; the last tile row/column is clipped to M-1 / N-1)."""
    tm, tn = -(-M // block_m), -(-N // block_n)
    with unset_fake_temporarily():
        i0 = (torch.arange(tm, dtype=torch.float64, device=_CPU) * block_m)[:, None]
        j0 = (torch.arange(tn, dtype=torch.float64, device=_CPU) * block_n)[None, :]
        i1 = torch.clamp(i0 + (block_m - 1), max=M - 1)
        j1 = torch.clamp(j0 + (block_n - 1), max=N - 1)
        return classify_tiles(expr, i0, i1, j0, j1, M=M, N=N, args=args, B=B, H=H).contiguous()


def skipped_fraction(expr: str, M: int, N: int, block_m: int = 128, block_n: int = 128,
                     args: Sequence[int] = (), **kw: Any) -> float:
    """The fraction of tiles that are EMPTY (skipped: no loads, no math)."""
    bm = block_map(expr, M, N, block_m, block_n, args, **kw)
    return float((bm == Tile.EMPTY).float().mean()) if bm.numel() else 0.0
