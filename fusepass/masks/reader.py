"""Read how a mask was built in the FX graph into a predicate over score positions.

The graph matcher calls this for every mask operand of an attention site::

    from fusepass.masks.reader import read_mask, try_read_mask

    # scores: the node of the [B, H, M, N] scores (q @ k^T); mask_node: what is added to them
    # (role "additive"), or the bool tensor given to masked_fill (role "masked") or to
    # where(mask, scores, fill) (role "keep").
    reading = read_mask(mask_node, "additive", scores.meta["example_value"].shape, example_inputs)
    if reading is None:
        ...                                   # keep the mask as a tensor: correct, only slower
    else:
        mask_expr = reading.expr              # "j <= i" / "(j <= i) & (j > i - a0)" / "" (none)
        mask_args = reading.args              # FX nodes (SymInts) or ints, aligned with a0, a1...
        masks = [n if not inv else ~n for n, inv in reading.data_masks]   # bool keep tensors
        mask_fill = reading.fill              # for "additive": the value of hidden entries
        for g in reading.guards:              # buffers read by value: check before trusting
            assert g.check(example_inputs[g.input_index])

``try_read_mask`` is the same but returns ``NotRead(reason)`` instead of None.  The value of
every node is computed by ``fusepass.masks.absint`` (abstract interpretation over index
symbols); this module turns the final value into predicate text (``fusepass.masks.predicate``
grammar) with ``b, h, i, j`` for the score axes and ``M, N`` or ``a<k>`` for sizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import sympy
import torch
import torch.fx as fx

from . import absint, predicate
from .absint import X, Unreadable, as_bool, is_bool, meta_value, size_expr
from .fills import ADDITIVE_READ_AT_MOST

log = logging.getLogger(__name__)

ROLES = ("keep", "masked", "additive")


@dataclass(frozen=True)
class Guard:
    """What must still hold for a buffer that was read by value.

    ``check(tensor)`` is cheap when the buffer is the same object, unchanged (data_ptr and
    ``_version``); otherwise it re-verifies the values against ``pattern`` (a predicate over
    i, j of the last two axes, True where the buffer is nonzero, equal across leading axes).
    """

    name: str                 # placeholder / attribute name
    input_index: Optional[int]  # index into example_inputs, or None for get_attr
    shape: tuple[int, ...]
    dtype: torch.dtype
    data_ptr: int
    version: int
    pattern: str
    fingerprint: float        # sum of the values (float64)

    def check(self, tensor: torch.Tensor, deep: bool = False) -> bool:
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            return False
        if not deep and tensor.data_ptr() == self.data_ptr and tensor._version == self.version:
            return True
        ok = matches_pattern(tensor, self.pattern)
        if not ok:
            log.debug("mask reader: buffer %s changed; its mask predicate is no longer trusted", self.name)
        return ok


@dataclass(frozen=True)
class MaskReading:
    expr: str                                 # predicate text (True = visible); "" = always visible
    args: tuple[Union[fx.Node, int], ...]     # values of a0, a1, ...
    guards: tuple[Guard, ...]
    data_masks: tuple[tuple[fx.Node, bool], ...]  # (node, invert): bool tensors AND-ed with expr
    fill: Optional[float]                     # additive role: value of hidden entries
    keep: Any                                 # the sympy boolean over b,h,i,j,M,N,a* (position part)

    @property
    def is_position_only(self) -> bool:
        return not self.data_masks


@dataclass(frozen=True)
class NotRead:
    reason: str

    def __bool__(self) -> bool:
        return False


def matches_pattern(t: torch.Tensor, pattern: str) -> bool:
    if t.dim() < 2:
        return False
    R, C = t.shape[-2], t.shape[-1]
    keep = predicate.dense_keep(pattern or "True", 1, 1, R, C, (), device=t.device)[0, 0]
    return bool(((t != 0) == keep).all())


_PATTERNS = ("j <= i + {k}", "j >= i + {k}", "abs(i - j) <= {k}")


def recognize_buffer(t: torch.Tensor, node: fx.Node) -> Optional[tuple[Any, str]]:
    """A 0/1 buffer as (value over its axes, pattern): all ones/zeros, tril, triu, a band."""
    if t.dim() < 2 or t.numel() == 0 or t.numel() > 1 << 26 or t.is_complex():
        return None
    if not bool(((t == 0) | (t == 1)).all()):
        return None
    nz = t != 0
    R, C = t.shape[-2], t.shape[-1]
    first = nz.reshape(-1, R, C)[0]
    row0 = first[0]
    candidates = ["True", "False"]
    ones = int(row0.sum())
    if ones:
        first_one = int(row0.nonzero()[0])
        candidates += [_PATTERNS[0].format(k=ones - 1), _PATTERNS[1].format(k=first_one),
                       _PATTERNS[2].format(k=ones - 1)]
    for pat in candidates:
        if matches_pattern(t, pat):
            r = t.dim()
            i, j = predicate.SYMBOLS["i"], predicate.SYMBOLS["j"]
            cond = predicate.to_sympy(pat) if pat not in ("True", "False") else sympy.sympify(pat == "True")
            cond = cond.xreplace({i: X[r - 2], j: X[r - 1]})
            value = cond if t.dtype == torch.bool else absint.as_num(cond)
            return value, ("" if pat == "True" else pat)
    return None


def _is_buffer_name(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    name = str(node.target).lower()
    return "buffers" in name or "_buffer" in name


def _placeholder_inputs(graph: fx.Graph, example_inputs) -> dict[fx.Node, tuple[int, Any]]:
    if example_inputs is None:
        return {}
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if isinstance(example_inputs, dict):
        return {n: (k, example_inputs[n.name]) for k, n in enumerate(phs) if n.name in example_inputs}
    return {n: (k, x) for k, (n, x) in enumerate(zip(phs, example_inputs))}


def _score_axes(R: int) -> dict[sympy.Symbol, sympy.Symbol]:
    S = predicate.SYMBOLS
    names = {4: "bhij", 3: "?ij", 2: "ij"}.get(R)
    if names is None:
        raise Unreadable(f"scores of rank {R}")
    return {X[k]: S[c] for k, c in enumerate(names) if c != "?"}


def _keep_from_value(v: Any, role: str) -> tuple[Any, Optional[float]]:
    if role == "keep":
        return as_bool(v), None
    if role == "masked":
        return sympy.Not(as_bool(v)), None
    v = absint.fold(v)
    branches = v.args if isinstance(v, sympy.Piecewise) else ((v, sympy.true),)
    keep, prev, fills = sympy.false, sympy.true, set()
    for val, cond in branches:
        if is_bool(val) or not val.is_number:
            raise Unreadable("an additive mask whose values are not constants")
        if val == 0:
            keep = sympy.Or(keep, sympy.And(prev, cond))
        elif val == -sympy.oo or (val.is_real and float(val) <= ADDITIVE_READ_AT_MOST):
            fills.add(float(val))
        else:
            raise Unreadable(f"additive value {val} is neither 0 nor a mask fill (a bias)")
        prev = sympy.And(prev, sympy.Not(cond))
    if len(fills) > 1:
        # Several distinct fills (e.g. min + min overflowing); any of them hides the key, and
        # for fully hidden rows eager gives uniform weights either way only if all are equal.
        raise Unreadable(f"additive mask with several fill values {sorted(fills)}")
    return keep, (fills.pop() if fills else None)


def try_read_mask(
    node: fx.Node,
    role: str,
    score_shape: Sequence[Any],
    example_inputs: Optional[Union[Sequence[Any], dict]] = None,
    *,
    read_inputs_by_value: bool = False,
) -> Union[MaskReading, NotRead]:
    """See the module docstring.  ``read_inputs_by_value``: also trust plain graph inputs
    (not only buffers) by value; their guards must then be checked on every call."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    graph = node.graph
    inputs = _placeholder_inputs(graph, example_inputs)
    owner = getattr(graph, "owning_module", None)

    def constant_tensor(n: fx.Node) -> Optional[torch.Tensor]:
        if n.op == "get_attr" and owner is not None:
            t = getattr(owner, str(n.target), None)
        elif n in inputs and (read_inputs_by_value or _is_buffer_name(n)):
            t = inputs[n][1]
        else:
            return None
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor) or t.is_meta:
            return None
        return t

    interp = absint.Interpreter(constant_tensor=constant_tensor, recognize=recognize_buffer)
    try:
        return _read(interp, node, role, [size_expr(s) for s in score_shape], inputs, owner)
    except Unreadable as e:
        log.debug("mask reader: %s (%s) not read: %s", node.name, role, e)
        return NotRead(str(e))


def read_mask(node, role, score_shape, example_inputs=None, **kw) -> Optional[MaskReading]:
    r = try_read_mask(node, role, score_shape, example_inputs, **kw)
    return r if isinstance(r, MaskReading) else None


def _read(interp, node, role, score, inputs, owner) -> MaskReading:
    R = len(score)
    mshape = absint.node_shape(node)
    if len(mshape) > R:
        raise Unreadable(f"mask of rank {len(mshape)} for scores of rank {R}")
    for ms, ss in zip(reversed(mshape), reversed(score)):
        if ms != 1 and sympy.simplify(ms - ss) != 0:
            raise Unreadable(f"mask size {ms} against score size {ss}")
    keep, fill = _keep_from_value(absint.shift(interp.value(node), len(mshape), R), role)
    keep = absint.normalize(tuple(score), keep)
    if R == 3 and keep.has(X[0]):
        raise Unreadable("mask varies over the fused batch*head axis")

    # Split into the position part and the data (atom) part, conjunct by conjunct.
    conjuncts = keep.args if isinstance(keep, sympy.And) else (keep,)
    atom_fns = set(interp.atoms)
    is_data = lambda c: any(isinstance(f, sympy.core.function.AppliedUndef) and f.func in atom_fns
                            for f in c.atoms(sympy.Function))
    pos = [c for c in conjuncts if not is_data(c)]
    data = [c for c in conjuncts if is_data(c)]
    data_masks = _match_data(interp, data, R) if data else ()
    position = sympy.And(*pos)

    # Sizes: node symbols -> M / N when equal to the score's sizes, else a0, a1, ...
    S = predicate.SYMBOLS
    sub: dict = dict(_score_axes(R))
    args: list = []
    for sym in sorted(position.free_symbols, key=lambda s: s.name):
        if sym not in interp.size_symbols:
            continue
        src = interp.size_symbols[sym]
        e = size_expr(meta_value(src))
        if e == score[-2]:
            sub[sym] = S["M"]
        elif e == score[-1]:
            sub[sym] = S["N"]
        else:
            sub[sym] = sympy.Symbol(f"a{len(args)}", integer=True)
            args.append(src)
    position = position.xreplace(sub)
    stray = {s for s in position.free_symbols if s.name.startswith("_")}
    if stray:
        raise Unreadable(f"symbols {sorted(map(str, stray))} are not sizes of graph nodes")
    try:
        text = "" if position is sympy.true else predicate.from_sympy(position)
    except predicate.PredicateError as e:
        raise Unreadable(str(e)) from None
    if text:
        predicate.parse_ast(text)

    guards = []
    for n, pattern in interp.buffers.items():
        t = (getattr(owner, str(n.target)) if n.op == "get_attr" else inputs[n][1])
        guards.append(Guard(
            name=n.name, input_index=None if n.op == "get_attr" else inputs[n][0],
            shape=tuple(t.shape), dtype=t.dtype, data_ptr=t.data_ptr(), version=t._version,
            pattern=pattern, fingerprint=float(t.double().sum()),
        ))
    return MaskReading(expr=text, args=tuple(args), guards=tuple(guards), data_masks=data_masks,
                       fill=fill, keep=position)


def _match_data(interp, data: list, R: int) -> tuple[tuple[fx.Node, bool], ...]:
    """Find, for each data conjunct, a graph node whose bool value is it (or its negation)."""
    table: dict = {}
    for n, v in interp.values.items():
        if not is_bool(v):
            continue
        mv = meta_value(n)
        if mv.dim() > R:
            continue
        v = absint.shift(v, mv.dim(), R)
        table.setdefault(_canonical(v), (n, False))
        table.setdefault(_canonical(sympy.Not(v)), (n, True))
    whole = _canonical(sympy.And(*data))
    if whole in table:
        return (table[whole],)
    out = []
    for c in data:
        if _canonical(c) not in table:
            raise Unreadable(f"data term {c} is not the value of any one graph node")
        out.append(table[_canonical(c)])
    return tuple(out)


def _canonical(e: Any) -> Any:
    """One spelling per relation, so that a term compares equal to the node that computed it
    even after sympy rewrote it (piecewise folding of an additive mask turns ``j <= i`` into
    ``i >= j``)."""
    if not isinstance(e, sympy.Basic):
        return e
    return e.replace(lambda x: isinstance(x, sympy.Rel), lambda x: x.canonical)
