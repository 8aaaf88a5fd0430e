"""Print a mask predicate (``fusepass.masks.predicate`` grammar) as a Triton expression.

The printed code keeps Python's integer semantics: ``//`` and ``%`` round towards minus
infinity in Python but towards zero in Triton, so they are printed as calls of the helpers
``_py_floordiv`` / ``_py_mod`` that ``templates/_score.py.jinja`` defines.  Chained
comparisons become a conjunction; ``~`` on a boolean becomes ``== 0``.
"""

from __future__ import annotations

import ast
import logging
from typing import Mapping

from fusepass.masks.predicate import parse_ast

log = logging.getLogger(__name__)

_BIN = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.BitAnd: "&", ast.BitOr: "|"}
_CMP = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


def uses_names(expr: str) -> set[str]:
    """The variable names a predicate reads (b, h, i, j, M, N, a0, ...)."""
    if not expr:
        return set()
    return {n.id for n in ast.walk(parse_ast(expr)) if isinstance(n, ast.Name) and n.id not in ("abs", "min", "max")}


def to_triton(expr: str, names: Mapping[str, str]) -> str:
    """``expr`` as Triton source; ``names`` maps b, h, i, j, M, N, a<k> to Triton expressions."""

    def p(node: ast.expr) -> str:
        if isinstance(node, ast.Constant):
            return str(int(node.value))
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return f"(-{p(node.operand)})"
            return f"({p(node.operand)} == 0)"
        if isinstance(node, ast.BinOp):
            a, b = p(node.left), p(node.right)
            if isinstance(node.op, ast.FloorDiv):
                return f"_py_floordiv({a}, {b})"
            if isinstance(node.op, ast.Mod):
                return f"_py_mod({a}, {b})"
            return f"({a} {_BIN[type(node.op)]} {b})"
        if isinstance(node, ast.Compare):
            terms, left = [], p(node.left)
            for op, comp in zip(node.ops, node.comparators):
                right = p(comp)
                terms.append(f"({left} {_CMP[type(op)]} {right})")
                left = right
            return terms[0] if len(terms) == 1 else "(" + " & ".join(terms) + ")"
        if isinstance(node, ast.Call):
            args = [p(a) for a in node.args]
            fn = node.func.id
            if fn == "abs":
                return f"tl.abs({args[0]})"
            out = args[0]
            for a in args[1:]:
                out = f"tl.{'minimum' if fn == 'min' else 'maximum'}({out}, {a})"
            return out
        raise ValueError(f"cannot print {ast.dump(node)} as Triton")

    return p(parse_ast(expr))
