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
from typing import Any, Optional, Sequence

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..masks import classify, predicate, tiles
from ..masks.fills import ADDITIVE_LIFT_AT_MOST
from ..masks.reader import Guard, read_mask
from . import nodes
from .matcher import Bias, Mask, Match

log = logging.getLogger(__name__)

_ARG = re.compile(r"\ba(\d+)\b")


def _renumber(expr: str, offset: int) -> str:
    return _ARG.sub(lambda m: f"a{int(m.group(1)) + offset}", expr) if offset else expr


def rows_never_empty(expr: str, M: Any, N: Any) -> bool:
    """Provably, every query row sees at least one key ("" hides nothing: True).

    Sufficient test: some key column that exists for every row (0, N - 1, and when M <= N the
    diagonal i or the bottom-right diagonal i + N - M) is visible for every i >= 0.  Sizes that
    are symbolic stay symbols (one symbol when M == N is known), so the proof holds for every
    shape the compiled graph serves; ``a<k>`` arguments stay free (unknown).
    """
    if not expr:
        return True
    S = predicate.SYMBOLS
    i = sympy.Symbol("i_row", integer=True, nonnegative=True)
    same = not isinstance(M, int) and statically_known_true(M == N)
    sizes = {}
    for name, size in (("M", M), ("N", N)):
        if isinstance(size, int):
            sizes[S[name]] = sympy.Integer(size)
        else:
            sizes[S[name]] = sympy.Symbol("MN_size" if same else f"{name}_size", integer=True, positive=True)
    if sizes[S["N"]].is_number and sizes[S["N"]] < 1:
        return False
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
    """Whether a gradient flows out of the site's scores: into q, k, v or any bias.

    In a row whose every key is hidden, eager's gradient of ``s + mask`` reaches q, k and every
    bias of that row; the op's replaced scores pass none.  (v is included to be safe.)
    """
    operands = [o.node for o in (match.q, match.k, match.v)] + [b.node for b in match.biases]
    return any(nodes.fake(n) is not None and nodes.fake(n).requires_grad for n in operands)


def _hides(fill: Optional[float]) -> bool:
    """An additive value that the op may treat as "replaced by fill" (``masks/fills.py``)."""
    return fill is not None and (fill == -math.inf or fill <= ADDITIVE_LIFT_AT_MOST)


def lift(match: Match, scores_shape: Sequence[Any], example_inputs: Sequence[Any]) -> None:
    """Rewrite ``match.masks`` / ``match.biases`` into ``match.mask_expr`` where readable.

    Bool masks replace scores as the op does: always lifted.  An additive mask (0 or a fill)
    agrees with a replacing predicate in every row that keeps a visible key; rows with none
    differ in three ways, so an additive mask is lifted only where none of them can occur:

    * eager's gradient flows through ``s + fill`` to q, k and the biases of such a row, the
      op's replaced scores pass none (only a concern when gradients are needed);
    * keys hidden twice sum to -inf in eager (``min + min`` overflows) while the op replaces
      every hidden key by one finite fill, so a fully hidden row averages other keys;
    * a bias kept as a tensor may itself be a mask, hiding the keys the predicate shows.

    So every lifted additive mask needs the "safe" case: no kept bias may hide, no data masks,
    and the combined predicate provably leaves no row empty.  Without it, inference still lifts
    additive masks whose fill is -inf (-inf + anything is -inf, exact) or a single finite-fill
    additive mask when nothing else can hide a key (every hidden entry is then exactly fill);
    all other additive masks stay biases (exact, just slower).
    """
    M, N = scores_shape[-2], scores_shape[-1]
    exprs: list[str] = []
    args: list[Any] = []
    guards: list[Guard] = []
    masks: list[Mask] = []

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

    # Additive candidates, and whether each bias that stays a tensor may hide keys: one read as
    # a mask (fill -1e9, fp16's min, ...) does; one that is not a mask-like constant (ALiBi, a
    # float mask given as input) may; a learned bias (requires grad) is taken not to.
    candidates: list[tuple[Bias, Any]] = []
    kept: list[tuple[Bias, bool]] = []
    for b in match.biases:
        reading = None
        learned = nodes.fake(b.node).requires_grad
        if b.coeff == 1.0 and not learned:
            reading = read_mask(b.node, "additive", scores_shape, example_inputs)
        if usable(reading) and _hides(reading.fill):
            candidates.append((b, reading))
        else:
            may_hide = not learned if reading is None else reading.fill is not None
            kept.append((b, may_hide))

    # One fill for the op: the bool masks', else -inf when an additive mask uses it (exact
    # whatever else is added), else the first finite one.
    fill = match.mask_fill if match.masks else None
    if fill is None and candidates:
        fills = [r.fill for _, r in candidates]
        fill = -math.inf if -math.inf in fills else fills[0]
    compatible = [(b, r) for b, r in candidates if r.fill == fill]
    kept += [(b, True) for b, r in candidates if r.fill != fill]

    lifted: list[tuple[Bias, Any]] = []
    if compatible:
        hiders = any(h for _, h in kept)
        data = bool(masks) or any(r.data_masks for _, r in compatible)
        combined, n_args = list(exprs), len(args)
        for _, r in compatible:  # numbered as take() will number them
            if r.expr:
                combined.append(_renumber(r.expr, n_args))
                n_args += len(r.args)
        combined_expr = " & ".join(f"({e})" for e in combined)
        safe = not hiders and not data and rows_never_empty(combined_expr, M, N)
        if safe:
            lifted = compatible
        elif _needs_grad(match):
            log.debug("additive masks kept as tensors: rows may be fully hidden and gradients are needed")
        elif fill == -math.inf:
            lifted = compatible
        elif len(compatible) == 1 and not hiders:
            lifted = compatible
        else:
            log.debug("additive masks kept as tensors: fully hidden rows would average other keys")
    for b, reading in lifted:
        take(reading)
    lifted_nodes = {id(b) for b, _ in lifted}
    for b, reading in candidates:
        if id(b) not in lifted_nodes:
            compact(b, reading)
    biases = [b for b in match.biases if id(b) not in lifted_nodes]
    if not exprs and len(masks) == len(match.masks) and len(biases) == len(match.biases):
        return
    # The bool masks' fill stays; lifted additive masks share it (or set it); else -inf.
    match.mask_fill = fill if (match.masks or lifted) else -math.inf
    match.masks, match.biases = masks, biases
    match.mask_expr = " & ".join(f"({e})" for e in exprs) if len(exprs) > 1 else "".join(exprs)
    match.mask_args = args
    match.guards = guards
    log.debug("mask read as %r with %d data mask(s)", match.mask_expr, len(masks))


def compact(b: Bias, reading) -> None:
    """An additive mask kept as a tensor (rows may be fully hidden), read as data masks only:
    its value is where(AND of the data masks, 0, fill) exactly (reader: every entry is 0 or the
    one fill), so the op may take that where() on the masks' own shape, e.g. a key-padding mask
    as [B, 1, 1, N] instead of the [B, 1, M, N] tensor the code materialized.  Not when a
    position part, arguments or guards come with it, or nothing would be smaller."""
    if reading.expr or reading.args or reading.guards or not reading.data_masks or reading.fill is None:
        return
    fakes = [nodes.fake(n) for n, _ in reading.data_masks]
    if any(f is None for f in fakes):
        return
    try:
        small = torch.broadcast_shapes(*(f.shape for f in fakes))
        full = nodes.fake(b.node).shape
        if len(small) > len(full) or math.prod(hint(s) for s in small) >= math.prod(hint(s) for s in full):
            return
    except Exception as e:  # symbolic sizes it cannot compare: keep the tensor as written
        log.debug("additive mask %s kept whole: %s", b.node.name, e)
        return
    b.compact = (tuple(reading.data_masks), float(reading.fill))
    log.debug("additive mask kept as tensor %s taken as where(data masks, 0, %g) of shape %s", b.node.name,
              reading.fill, tuple(small))


# fp16 spacing reaches 2 at 2048: a fill this large absorbs the scores' fractions in eager's sum.
FP16_ABSORBING_FILL = -2048.0


def fp16_absorbing_bias(match: Match, scores_shape: Sequence[Any], example_inputs: Optional[Sequence[Any]]) -> Optional[str]:
    """Why a float16 site must stay as written, or None.

    A mask kept as a bias (``s + where(keep, 0, fill)`` with a large finite fill) is summed in
    fp16 by eager: in a row whose every key it hides, ``s + fill`` rounds to a few values (fp16's
    -65504 has a spacing of 32), so eager's row is uniform over the keys tied at its max, while
    the op's fp32 sum keeps ``s`` and gives softmax(s).  Unless every row provably keeps a
    visible key, such a site is refused.  (A float16 bias is taken to be summed in float16:
    conservative when the scores were upcast first.)"""
    M, N = scores_shape[-2], scores_shape[-1]
    for b in match.biases:
        fake = nodes.fake(b.node)
        if fake is None or fake.dtype != torch.float16:
            continue
        reading = read_mask(b.node, "additive", scores_shape, example_inputs)
        if reading is None or reading.fill is None or not math.isfinite(reading.fill):
            continue
        if reading.fill > FP16_ABSORBING_FILL:
            continue
        keep = " & ".join(f"({e})" for e in (match.mask_expr, reading.expr) if e)
        if reading.data_masks or match.masks or not rows_never_empty(keep, M, N):
            return ("float16 with a mask kept as an additive bias (fill "
                    f"{reading.fill:g}) in rows that may be fully hidden: eager's fp16 sum absorbs the "
                    "scores there (a uniform row), the op's fp32 sum does not")
    return None


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
