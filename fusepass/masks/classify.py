"""Simplify a mask predicate and name its structure for ``explain``.

Recognised building blocks, over the query index i and key index j:

    diagonal bounds   j - i <= u   (u = 0: causal; u = N - M: causal aligned bottom-right)
                      j - i >= l   (with an upper bound: a sliding window of u - l + 1 keys)
    band              abs(i - j) <= w
    chunked           i // c == j // c
    global columns    j < g        (with causal in an Or: prefix-LM)
    global rows       i < g
and their unions / intersections.  Anything else is "custom" and named by its text.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import sympy

from . import predicate

log = logging.getLogger(__name__)

_I, _J = predicate.SYMBOLS["i"], predicate.SYMBOLS["j"]
_M, _N = predicate.SYMBOLS["M"], predicate.SYMBOLS["N"]


@dataclass(frozen=True)
class MaskClass:
    kind: str        # full, empty, causal, sliding_window, band, chunked, prefix_lm, global, ...
    name: str        # short human name, e.g. "causal", "sliding_window(1024)"
    text: str        # the simplified predicate text


@dataclass(frozen=True)
class _Atom:
    kind: str                       # upper, lower, band, chunk, col, row
    bound: sympy.Expr


def _linear(d: sympy.Expr) -> Optional[tuple[sympy.Expr, sympy.Expr, sympy.Expr]]:
    d = sympy.expand(d)
    ci, cj = d.coeff(_I), d.coeff(_J)
    rest = sympy.expand(d - ci * _I - cj * _J)
    if rest.has(_I) or rest.has(_J) or ci.has(_I, _J) or cj.has(_I, _J):
        return None
    return ci, cj, rest


def _atom(e: sympy.Basic) -> Optional[_Atom]:
    """One relation as a building block, or None."""
    if not isinstance(e, sympy.Rel):
        return None
    # chunked: floor(i/c) == floor(j/c)
    if isinstance(e, sympy.Eq):
        a, b = e.lhs, e.rhs
        if isinstance(a, sympy.floor) and isinstance(b, sympy.floor):
            ca, cb = (sympy.simplify(x.args[0] / y) for x, y in ((a, _I), (b, _J)))
            if ca == cb and ca.is_number and not ca.has(_I, _J):
                return _Atom("chunk", 1 / ca)
            ca, cb = (sympy.simplify(x.args[0] / y) for x, y in ((a, _J), (b, _I)))
            if ca == cb and ca.is_number:
                return _Atom("chunk", 1 / ca)
        return None
    strict = isinstance(e, (sympy.Lt, sympy.Gt))
    le = isinstance(e, (sympy.Lt, sympy.Le))
    if not isinstance(e, (sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge)):
        return None
    d = e.lhs - e.rhs if le else e.rhs - e.lhs          # d <= 0 (or < 0)
    if isinstance(e.lhs if le else e.rhs, sympy.Abs):
        inner = (e.lhs if le else e.rhs).args[0]
        lin = _linear(inner)
        w = sympy.expand(-(d - (e.lhs if le else e.rhs)))
        if lin and abs(lin[0]) == 1 and lin[1] == -lin[0] and lin[2] == 0 and not w.has(_I, _J):
            return _Atom("band", w - 1 if strict else w)
        return None
    lin = _linear(d)
    if lin is None:
        return None
    ci, cj, r = lin
    off = 1 if strict else 0
    if ci == -1 and cj == 1:            # j - i + r <= 0  ->  j - i <= -r
        return _Atom("upper", -r - off)
    if ci == 1 and cj == -1:            # i - j + r <= 0  ->  j - i >= r
        return _Atom("lower", r + off)
    if ci == 0 and cj == 1:             # j <= -r
        return _Atom("col", -r - off + 1)   # j < g
    if ci == 1 and cj == 0:
        return _Atom("row", -r - off + 1)   # i < g
    return None


def _causal_name(u: sympy.Expr) -> str:
    if u == 0:
        return "causal"
    if sympy.expand(u - (_N - _M)) == 0:
        return "causal(bottom_right)"
    return f"causal(offset={u})"


def _describe_and(args) -> Optional[tuple[str, str]]:
    atoms = [_atom(a) for a in args]
    if any(a is None for a in atoms):
        return None
    by = {}
    for a in atoms:
        by.setdefault(a.kind, []).append(a.bound)
    if set(by) - {"upper", "lower", "chunk", "band"} or any(len(v) > 1 for v in by.values()):
        return None
    up, lo = by.get("upper", [None])[0], by.get("lower", [None])[0]
    parts = []
    if up is not None and lo is not None:
        w = sympy.expand(up - lo + 1)
        if up == 0:
            parts.append(("sliding_window", f"sliding_window({w})"))
        else:
            parts.append(("sliding_window", f"sliding_window({w}, offset={up})"))
    elif up is not None:
        parts.append(("causal", _causal_name(up)))
    elif lo is not None:
        parts.append(("lower_bound", f"j >= i + {lo}" if lo != 0 else "anti_causal"))
    if "band" in by:
        parts.append(("band", f"band({by['band'][0]})"))
    if "chunk" in by:
        parts.append(("chunked", f"chunked({by['chunk'][0]})"))
    kind = parts[0][0] if len(parts) == 1 else "intersection"
    if [p[0] for p in parts] == ["causal", "chunked"]:
        kind = "chunked_causal"
    return kind, " & ".join(p[1] for p in parts)


def _describe(e: sympy.Basic) -> tuple[str, str]:
    if e is sympy.true:
        return "full", "full"
    if e is sympy.false:
        return "empty", "empty"
    if isinstance(e, sympy.Or):
        cols = [a for a in e.args if (x := _atom(a)) is not None and x.kind == "col"]
        rows = [a for a in e.args if (x := _atom(a)) is not None and x.kind == "row"]
        rest = [a for a in e.args if a not in cols and a not in rows]
        if rest and (cols or rows):
            base_kind, base = _describe(sympy.Or(*rest))
            extra = []
            if cols and not rows and base_kind == "causal" and base == "causal":
                return "prefix_lm", f"prefix_lm({_atom(cols[0]).bound})"
            if cols:
                extra.append(f"global_columns({', '.join(str(_atom(c).bound) for c in cols)})")
            if rows:
                extra.append(f"global_rows({', '.join(str(_atom(r).bound) for r in rows)})")
            return "global", f"{base} | " + " | ".join(extra)
        names = [_describe(a) for a in e.args]
        return "union", " | ".join(f"({n})" if " " in n else n for _, n in names)
    args = e.args if isinstance(e, sympy.And) else (e,)
    got = _describe_and(args)
    if got is not None:
        return got
    if isinstance(e, sympy.And):
        # Name the recognisable conjuncts, print the rest.
        known = [a for a in args if _atom(a) is not None]
        other = [a for a in args if _atom(a) is None]
        if known and (k := _describe_and(known)) is not None:
            return "intersection", " & ".join([k[1]] + [_safe_text(o) for o in other])
    return "custom", _safe_text(e)


@functools.lru_cache(maxsize=512)
def classify(expr: str) -> MaskClass:
    """Kind and short name of a predicate (text in the ``predicate`` grammar; "" = full)."""
    if not expr:
        return MaskClass("full", "full", "")
    orig = e = sympy.sympify(predicate.to_sympy(expr))
    try:
        if len(e.atoms(sympy.Rel)) <= 6:
            e = sympy.simplify_logic(e)
        text = "" if e is sympy.true else predicate.from_sympy(e)
        predicate.parse_ast(text or "True")
    except Exception as err:  # sympy may rewrite into forms the grammar lacks: keep the input
        log.debug("classify: simplifying %s gave no predicate text (%s)", expr, err)
        e, text = orig, expr
    kind, name = _describe(e)
    return MaskClass(kind, name, text)


def describe(expr: str) -> str:
    """The short name only (for ``explain``); "tensor" is the caller's word for no predicate."""
    return classify(expr).name


def _safe_text(e: sympy.Basic) -> str:
    try:
        return predicate.from_sympy(e)
    except predicate.PredicateError:
        return str(e)
