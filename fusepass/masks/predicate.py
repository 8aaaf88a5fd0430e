"""Mask predicates: the text the op carries, and its two readings (sympy and torch).

A predicate is a Python expression over the score position and sizes:

    b, h      batch and query-head index
    i, j      query index in [0, M) and key index in [0, N)
    M, N      query and key lengths
    a0, a1..  extra integers passed to the op as ``mask_args`` (may be symbolic sizes)

with integer literals, ``+ - * // %``, unary ``-``, comparisons, ``&`` ``|`` ``~`` on
booleans, and ``abs``, ``min``, ``max``.  True means the key is visible.  Example, causal
attention whose queries are the last M of N positions: ``j <= i + (N - M)``.

The text is validated against this grammar before anything evaluates it.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from typing import Any, Callable, Mapping

import sympy
import torch

POSITION_NAMES = ("b", "h", "i", "j", "M", "N")
_ARG_NAME = re.compile(r"^a\d+$")

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_FUNCS = ("abs", "min", "max")


class PredicateError(ValueError):
    pass


@functools.lru_cache(maxsize=256)
def parse_ast(expr: str) -> ast.expr:
    """Parse and validate; raises PredicateError naming what is not allowed."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise PredicateError(f"mask predicate {expr!r} is not an expression: {e.msg}") from None
    for node in ast.walk(tree):
        ok = isinstance(
            node,
            (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Constant,
             ast.Load, ast.USub, ast.Invert, *_BINOPS, *_CMPOPS),
        )
        if isinstance(node, ast.Name):
            ok = node.id in POSITION_NAMES or node.id in _FUNCS or bool(_ARG_NAME.match(node.id))
        elif isinstance(node, ast.Constant):
            ok = isinstance(node.value, (int, bool))
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords
        if not ok:
            raise PredicateError(f"mask predicate {expr!r}: {ast.dump(node)[:60]} is not allowed")
    return tree.body


@functools.lru_cache(maxsize=256)
def is_boolean(expr: str) -> bool:
    """Does the (valid) predicate give a bool, by its form: a comparison, a bool literal, or
    ``&`` / ``|`` / ``~`` of such?  (``j - i`` is an int: refused before anything runs it.)"""

    def boolean(node: ast.expr) -> bool:
        if isinstance(node, ast.Compare):
            return True
        if isinstance(node, ast.Constant):
            return isinstance(node.value, bool)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return boolean(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            return boolean(node.left) and boolean(node.right)
        return False

    return boolean(parse_ast(expr))


def arg_count(expr: str) -> int:
    """How many ``a<k>`` arguments the predicate refers to (1 + the highest k)."""
    if not expr:
        return 0
    ks = [int(n.id[1:]) for n in ast.walk(parse_ast(expr)) if isinstance(n, ast.Name) and _ARG_NAME.match(n.id)]
    return max(ks) + 1 if ks else 0


def _evaluate(node: ast.expr, env: Mapping[str, Any], lib: Mapping[str, Callable]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return lib["binop"](type(node.op), _evaluate(node.left, env, lib), _evaluate(node.right, env, lib))
    if isinstance(node, ast.UnaryOp):
        x = _evaluate(node.operand, env, lib)
        return -x if isinstance(node.op, ast.USub) else lib["not"](x)
    if isinstance(node, ast.Compare):
        result, left = None, _evaluate(node.left, env, lib)
        for op, comp in zip(node.ops, node.comparators):
            right = _evaluate(comp, env, lib)
            term = lib.get("cmp", _CMPOPS)[type(op)](left, right)
            result = term if result is None else lib["binop"](ast.BitAnd, result, term)
            left = right
        return result
    if isinstance(node, ast.Call):
        args = [_evaluate(a, env, lib) for a in node.args]
        return lib[node.func.id](*args)
    raise PredicateError(f"cannot evaluate {ast.dump(node)}")


def _torch_binop(op: type, a: Any, b: Any) -> Any:
    if op is ast.FloorDiv and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        return torch.div(a, b, rounding_mode="floor")
    return _BINOPS[op](a, b)


def _torch_not(x: Any) -> Any:
    return ~x if isinstance(x, torch.Tensor) else (not x)


def _torch_minmax(fn_t, fn_py):
    def f(*xs):
        out = xs[0]
        for x in xs[1:]:
            if isinstance(out, torch.Tensor) or isinstance(x, torch.Tensor):
                out = fn_t(torch.as_tensor(out), torch.as_tensor(x))
            else:
                out = fn_py(out, x)
        return out

    return f


_TORCH_LIB = {
    "binop": _torch_binop,
    "not": _torch_not,
    "abs": lambda x: x.abs() if isinstance(x, torch.Tensor) else abs(x),
    "min": _torch_minmax(torch.minimum, min),
    "max": _torch_minmax(torch.maximum, max),
}


def evaluate_torch(expr: str, **env: Any) -> Any:
    """Evaluate on tensors (or ints) bound to b, h, i, j, M, N, a0...; broadcasting applies."""
    return _evaluate(parse_ast(expr), env, _TORCH_LIB)


def dense_keep(expr: str, B: int, H: int, M: int, N: int, args, device=None) -> torch.Tensor:
    """The predicate as a bool tensor broadcastable to [B, H, M, N] (for tests and small inputs)."""
    idx = lambda n, dim: torch.arange(n, device=device).view([-1 if d == dim else 1 for d in range(4)])
    env = dict(b=idx(B, 0), h=idx(H, 1), i=idx(M, 2), j=idx(N, 3), M=M, N=N)
    env.update({f"a{k}": int(a) for k, a in enumerate(args)})
    keep = evaluate_torch(expr, **env)
    return torch.as_tensor(keep, device=device).expand(B, H, M, N)


SYMBOLS = {name: sympy.Symbol(name, integer=True) for name in POSITION_NAMES}


def _sympy_binop(op: type, a: Any, b: Any) -> Any:
    if op is ast.BitAnd:
        return sympy.And(a, b)
    if op is ast.BitOr:
        return sympy.Or(a, b)
    if op is ast.FloorDiv:
        return sympy.floor(a / b)
    if op is ast.Mod:
        return sympy.Mod(a, b)
    return _BINOPS[op](a, b)


_SYMPY_LIB = {
    # == and != must build relations: Python's == on sympy objects is structural equality.
    "cmp": {**_CMPOPS, ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne},
    "binop": _sympy_binop,
    "not": sympy.Not,
    "abs": sympy.Abs,
    "min": sympy.Min,
    "max": sympy.Max,
}


def to_sympy(expr: str) -> sympy.Basic:
    """The predicate as a sympy boolean over the symbols in ``SYMBOLS`` and a0, a1, ..."""
    env = dict(SYMBOLS)
    env.update({f"a{k}": sympy.Symbol(f"a{k}", integer=True) for k in range(arg_count(expr))})
    # sympify: a constant predicate ("False": an additive mask that hides every key) evaluates
    # to a Python bool, which has none of sympy's methods.
    return sympy.sympify(_evaluate(parse_ast(expr), env, _SYMPY_LIB))


def from_sympy(e: Any) -> str:
    """A sympy boolean as predicate text; raises PredicateError for what the grammar cannot say."""
    t = _text(e)
    return ast.unparse(ast.parse(t, mode="eval"))


def _text(e: Any) -> str:
    if e is sympy.true or e is True:
        return "True"
    if e is sympy.false or e is False:
        return "False"
    if isinstance(e, sympy.Symbol):
        return e.name
    if isinstance(e, sympy.Integer):
        return f"({int(e)})"
    if isinstance(e, sympy.And):
        return "(" + " & ".join(_text(a) for a in e.args) + ")"
    if isinstance(e, sympy.Or):
        return "(" + " | ".join(_text(a) for a in e.args) + ")"
    if isinstance(e, sympy.Not):
        return f"(~{_text(e.args[0])})"
    if isinstance(e, sympy.Rel):
        ops = {sympy.Lt: "<", sympy.Le: "<=", sympy.Gt: ">", sympy.Ge: ">=", sympy.Eq: "==", sympy.Ne: "!="}
        op = ops.get(type(e))
        if op is None:
            raise PredicateError(f"relation {type(e).__name__}")
        return f"({_text(e.lhs)} {op} {_text(e.rhs)})"
    if isinstance(e, sympy.Add):
        terms = e.as_ordered_terms()
        out = _text(terms[0])
        for t in terms[1:]:
            c, rest = t.as_coeff_Mul()
            out += f" - {_text(-t)}" if c.is_negative else f" + {_text(t)}"
        return f"({out})"
    if isinstance(e, sympy.Mul):
        num, den = e.as_numer_denom()
        if den != 1:
            raise PredicateError("a fraction")
        c, rest = e.as_coeff_Mul()
        if c == -1:
            return f"(-{_text(rest)})"
        return "(" + " * ".join(_text(a) for a in e.args) + ")"
    if isinstance(e, sympy.floor):
        num, den = e.args[0].as_numer_denom()
        return f"({_text(sympy.expand(num))} // {_text(den)})"
    if isinstance(e, sympy.Mod):
        return f"({_text(e.args[0])} % {_text(e.args[1])})"
    if isinstance(e, sympy.Abs):
        return f"abs({_text(e.args[0])})"
    if isinstance(e, (sympy.Min, sympy.Max)):
        return f"{type(e).__name__.lower()}(" + ", ".join(_text(a) for a in e.args) + ")"
    if isinstance(e, sympy.Pow) and e.exp == -1:
        raise PredicateError("a fraction")
    raise PredicateError(f"{type(e).__name__} in the predicate")
