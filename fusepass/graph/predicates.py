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

import torch
import torch.fx as fx

from ..masks import classify, tiles
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


def lift(match: Match, scores_shape: Sequence[Any], example_inputs: Sequence[Any]) -> None:
    """Rewrite ``match.masks`` / ``match.biases`` into ``match.mask_expr`` where readable."""
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
