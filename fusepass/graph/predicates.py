"""Lift masks read from their construction into the op's position predicate.

For each mask operand of a match (bool ``masked_fill`` / ``where`` conditions, and additive
float masks that are 0 or a fill value), ``fusepass.masks.reader`` tries to express it as a
predicate over (b, h, i, j).  What it reads leaves the tensor path: the kernels evaluate the
predicate from positions and skip the tiles it rules out.  What it cannot read stays a tensor.
Buffers read by value (a ``tril`` buffer) come with guards the backend checks on every call.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..masks import classify, predicate, tiles
from ..masks.reader import Guard, read_mask
from . import nodes
from .matcher import Bias, Mask, Match

log = logging.getLogger(__name__)

# An additive fill becomes "replaced by fill" only where s + fill == fill for every
# realistic score s in fp32/bf16 (|s| far below 2**100): -inf, or the finfo.min of fp32/bf16.
# fp16's finfo.min (-65504) is not: a fully masked fp16 row would softmax its scores.
ADDITIVE_FILL_AT_MOST = -1e30
_ARG = re.compile(r"\ba(\d+)\b")


def _renumber(expr: str, offset: int) -> str:
    return _ARG.sub(lambda m: f"a{int(m.group(1)) + offset}", expr) if offset else expr


def rows_never_empty(expr: str, M: Any, N: Any) -> bool:
    """Provably, every query row sees at least one key.

    Sufficient test: some key column that exists for every row (0, N - 1, and when M <= N the
    diagonal i or the bottom-right diagonal i + N - M) is visible for every i >= 0.
    """
    S = predicate.SYMBOLS
    i = sympy.Symbol("i_row", integer=True, nonnegative=True)
    sizes = {}
    for name, size in (("M", M), ("N", N)):
        sizes[S[name]] = size if isinstance(size, int) else sympy.Symbol(f"{name}_size", integer=True, positive=True)
    keep = predicate.to_sympy(expr).subs(S["i"], i).subs(sizes)
    m, n = sizes[S["M"]], sizes[S["N"]]
    columns = [0, n - 1]
    if statically_known_true(M <= N):
        columns += [i, i + n - m]
    for j in columns:
        if sympy.simplify(keep.subs(S["j"], j)) is sympy.true:
            return True
    return False


def _needs_grad(match: Match) -> bool:
    return any(nodes.fake(o.node).requires_grad for o in (match.q, match.k, match.v))


def lift(match: Match, scores_shape: Sequence[Any], example_inputs: Sequence[Any]) -> None:
    """Rewrite ``match.masks`` / ``match.biases`` into ``match.mask_expr`` where readable.

    An additive mask differs from a replacing one only in rows where every key is hidden:
    there eager's gradient flows through ``s + fill`` to q and k, while the op's masked scores
    take none.  So when gradients are needed, an additive mask is lifted only when its
    predicate provably leaves no row empty; otherwise it stays a bias (exact, just slower).
    """
    needs_grad = _needs_grad(match)
    exprs: list[str] = []
    args: list[Any] = []
    guards: list[Guard] = []
    masks: list[Mask] = []
    fill = match.mask_fill if match.masks else None

    def take(reading) -> None:
        if reading.expr:
            exprs.append(_renumber(reading.expr, len(args)))
            args.extend(reading.args)
        guards.extend(reading.guards)
        masks.extend(Mask(node, not invert) for node, invert in reading.data_masks)

    def usable(reading) -> bool:
        return reading is not None and all(g.input_index is not None for g in reading.guards)

    for mk in match.masks:
        reading = read_mask(mk.cond, "keep" if mk.keep_when else "masked", scores_shape, example_inputs)
        if usable(reading):
            take(reading)
        else:
            masks.append(mk)
    biases: list[Bias] = []
    for b in match.biases:
        reading = None
        if b.coeff == 1.0 and not nodes.fake(b.node).requires_grad:
            reading = read_mask(b.node, "additive", scores_shape, example_inputs)
        ok = usable(reading) and reading.fill is not None and (
            reading.fill == -math.inf or reading.fill <= ADDITIVE_FILL_AT_MOST)
        if ok and needs_grad and (reading.data_masks or not reading.expr
                                  or not rows_never_empty(reading.expr, scores_shape[-2], scores_shape[-1])):
            log.debug("additive mask kept as a tensor: rows may be fully hidden and gradients are needed")
            ok = False
        if ok and (fill is None or reading.fill == fill):
            fill = reading.fill
            take(reading)
        else:
            biases.append(b)
    if not exprs and len(masks) == len(match.masks) and len(biases) == len(match.biases):
        return
    match.masks, match.biases = masks, biases
    match.mask_fill = fill if fill is not None else -math.inf
    match.mask_expr = " & ".join(f"({e})" for e in exprs) if len(exprs) > 1 else "".join(exprs)
    match.mask_args = args
    match.guards = guards
    log.debug("mask read as %r with %d data mask(s)", match.mask_expr, len(masks))


def hint(x: Any) -> int:
    """A concrete int for an int, a SymInt, or a node holding one (its example value)."""
    if isinstance(x, fx.Node):
        x = x.meta.get("example_value", x.meta.get("val"))
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return int(x)


def description(match: Match) -> str:
    if match.mask_expr:
        name = classify.describe(match.mask_expr)
        return f"{name} & tensor" if match.masks else name
    return "tensor" if match.masks else "none"


def skipped_fraction(match: Match, M: Any, N: Any, block: int = 128) -> float:
    """Fraction of (block x block) tiles the predicate rules out at the example shape."""
    if not match.mask_expr:
        return 0.0
    args = [hint(a) for a in match.mask_args]
    return tiles.skipped_fraction(match.mask_expr, hint(M), hint(N), block, block, args)
