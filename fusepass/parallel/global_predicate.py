"""A chunk pair's mask predicate, on global positions.

The op evaluates ``mask_expr`` with i, j counted from the start of the q and k it is given and
M, N their lengths.  For a (query segment, key segment) pair the ring rewrites the expression
so that i, j are global positions and M, N the global lengths::

    i -> (i + a<n>)    j -> (j + a<n+1>)    M -> a<n+2>    N -> a<n+3>

with n the call's own mask_args count: the offsets are extra ``mask_args``, so one expression
(one compiled kernel variant) serves every pair of a call.
"""

from __future__ import annotations

import ast
import functools

from fusepass.masks import predicate, tiles


@functools.lru_cache(maxsize=256)
def on_global_positions(expr: str, n_args: int) -> str:
    """``expr`` with i, j, M, N read from mask_args n_args .. n_args+3 (see the module docstring)."""
    if not expr:
        return ""
    names = {"i": f"(i + a{n_args})", "j": f"(j + a{n_args + 1})", "M": f"a{n_args + 2}", "N": f"a{n_args + 3}"}

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            text = names.get(node.id)
            return ast.parse(text, mode="eval").body if text else node

    predicate.parse_ast(expr)  # validates; its tree is cached and shared, so rename a fresh one
    return ast.unparse(Rename().visit(ast.parse(expr, mode="eval")))


def pair_args(mask_args: tuple, q_start: int, k_start: int, q_total: int, k_total: int) -> tuple:
    """The mask_args of a pair's call: the call's own, then the pair's offsets and the global lengths."""
    return (*mask_args, q_start, k_start, q_total, k_total)


@functools.lru_cache(maxsize=4096)
def hides_all(global_expr: str, args: tuple, q_len: int, k_len: int) -> bool:
    """Can no score of the pair be visible?  Decided from the expression at the chunk bounds
    (interval reasoning, sound: False when in doubt)."""
    if not global_expr:
        return False
    kind = tiles.classify_tiles(global_expr, 0, q_len - 1, 0, k_len - 1, M=q_len, N=k_len, args=args)
    return int(kind) == int(tiles.Tile.EMPTY)
