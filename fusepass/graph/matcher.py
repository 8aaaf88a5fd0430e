"""Find attention sites: anchor on softmax, walk back to Q·Kᵀ and forward to P·V.

Between the two contractions every intermediate must have exactly one user (the next step),
so the region is convex and nothing the op replaces escapes: attention weights that are
returned or summed into a loss refuse the match.  What the walk reads on the way (scales,
softcap, biases, masks, casts, dropout) becomes the op's arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fusepass.kernels.limits import FINITE_FILL_LIMIT  # one limit for the matcher and the kernels
from fusepass.kernels.support import SERVED_DTYPES  # one list for the matcher and the kernels

from . import nodes
from .contractions import PV, QK, Operand, Refusal, is_contraction, read_pv, read_qk, read_repeat

log = logging.getLogger(__name__)

SERVED_DEVICES = ("cpu", "cuda")
MAX_WALK = 32


@dataclasses.dataclass
class Bias:
    node: fx.Node
    coeff: float
    # An additive mask kept as a tensor whose value is where(AND of these bool tensors, 0, fill),
    # with no position part (graph/predicates.compact): the op takes that where() on the masks'
    # own, smaller shape (a key-padding mask as [B, 1, 1, N], not [B, 1, M, N]).
    compact: Optional[tuple[tuple[tuple[fx.Node, bool], ...], float]] = None

    def shape(self) -> tuple:
        """The shape the op receives: the compact form's broadcast shape, else the node's."""
        if self.compact is None:
            return tuple(nodes.fake(self.node).shape)
        return tuple(torch.broadcast_shapes(*(nodes.fake(n).shape for n, _ in self.compact[0])))


@dataclasses.dataclass
class Mask:
    cond: fx.Node
    keep_when: bool


@dataclasses.dataclass
class Match:
    """A site that can be fused: everything the rewrite needs."""

    softmax: fx.Node
    out_node: fx.Node  # the P @ V node whose uses the op takes over
    q: Operand
    k: Operand
    v: Operand
    scores_rank: int
    scale: float
    softcap: float
    biases: list[Bias]
    masks: list[Mask]
    mask_fill: float
    dropout_p: float
    out_perm: Optional[tuple] = None  # einsum output order: permute the op's [B, H, M, Dv] by it
    gqa_groups: int = 1
    gqa_source: str = ""
    # Run-time scale factors (symbolic floats): the rewrite folds them into q.
    symbolic_scale: list = dataclasses.field(default_factory=list)
    # Filled by graph/predicates.py when masks are read from their construction.
    mask_expr: str = ""
    mask_args: list = dataclasses.field(default_factory=list)  # ints or SymInt nodes: a0, a1, ...
    guards: list = dataclasses.field(default_factory=list)  # buffers read by value


def _reads_dtype_only(user: fx.Node, node: fx.Node) -> bool:
    """``x.type_as(node)`` / ``x.to(node)`` read node's dtype, not its values (T5 does this)."""
    return user.op == "call_method" and user.target in ("type_as", "to") and user.args[0] is not node


def _single_user(node: fx.Node, what: str) -> None:
    users = [u for u in node.users if not _reads_dtype_only(u, node)]
    if len(users) != 1:
        raise Refusal(f"{what} ({node.name}) has {len(users)} users: attention weights or scores are used elsewhere")


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = nodes.fake(a).shape, nodes.fake(b).shape
    return len(sa) == len(sb) and all(statically_known_true(x == y) for x, y in zip(sa, sb))


class _ScoreState:
    """Accumulates score = alpha * core + sum(coeff * bias), then masks, in program order."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.inner: Optional[float] = None  # the alpha inside tanh, once softcapped
        self.biases: list[Bias] = []
        self.masks: list[Mask] = []
        self.fill: Optional[float] = None
        self.symbolic: list[nodes.SymbolicFactor] = []

    def scale_by(self, c) -> None:
        if isinstance(c, nodes.SymbolicFactor):
            # Known only at run time: the rewrite multiplies q by it, which is exact only while
            # nothing but the product has been formed.
            if self.biases or self.masks or self.inner is not None:
                raise Refusal("a symbolic scale is applied after a bias, a mask or a softcap")
            self.symbolic.append(c)
            return
        if self.masks:
            raise Refusal("scores are scaled after masking")
        if not c > 0:
            raise Refusal(f"scores are scaled by a non-positive factor {c}")
        self.alpha *= c
        for b in self.biases:
            b.coeff *= c

    def add_bias(self, node: fx.Node, coeff: float) -> None:
        if self.masks and self.fill != -math.inf:
            raise Refusal("a bias is added after a mask with a finite fill")
        self.biases.append(Bias(node, coeff))

    def tanh(self) -> None:
        if self.biases or self.masks or self.inner is not None:
            raise Refusal("tanh (softcap) applied after a bias, a mask or another tanh")
        self.inner, self.alpha = self.alpha, 1.0

    def mask(self, op: nodes.MaskOp) -> None:
        if self.fill is not None and op.fill != self.fill:
            raise Refusal(f"masks fill with different values ({self.fill} and {op.fill})")
        if op.fill != -math.inf and op.fill > FINITE_FILL_LIMIT:
            raise Refusal(f"mask fill value {op.fill} is not -inf or a large negative number")
        self.fill = op.fill
        self.masks.append(Mask(op.cond, op.keep_when))

    def scale_and_softcap(self) -> tuple[float, float]:
        if self.inner is None:
            return self.alpha, 0.0
        # c2 * tanh(c1 * qk) == softcap * tanh(scale * qk / softcap) with softcap = c2.
        return self.inner * self.alpha, self.alpha


def _walk_scores(softmax_in: fx.Node) -> tuple[QK, fx.Node, list[fx.Node]]:
    """From the softmax input back to the first contraction; returns it and the steps in order."""
    steps: list[fx.Node] = []
    node = softmax_in
    for _ in range(MAX_WALK):
        if is_contraction(node):
            qk = read_qk(node)
            if qk is not None:
                return qk, node, steps[::-1]
        _single_user(node, "a score intermediate")
        steps.append(node)
        nxt = _score_step_input(node)
        if nxt is None:
            raise Refusal(f"unsupported op between Q·Kᵀ and softmax: {nodes.describe(node)}")
        node = nxt
    raise Refusal("no contraction found within the score chain")


def _score_step_input(node: fx.Node) -> Optional[fx.Node]:
    x = nodes.cast_input(node)
    if x is not None:
        return x
    scaled = nodes.scalar_scale(node)
    if scaled is not None:
        return scaled[0]
    add = nodes.tensor_add(node)
    if add is not None:
        a, b, coeff = add
        # The scores may be either side of a +; a - only has them on the left.
        return a if coeff != 1.0 or _leads_to_contraction(a) else b
    mask = nodes.mask_op(node)
    if mask is not None:
        return mask.scores
    if nodes.is_tanh(node):
        return nodes.self_arg(node)
    return None


def _leads_to_contraction(node: fx.Node, depth: int = MAX_WALK, seen: Optional[set] = None) -> bool:
    """Whether following score-chain ops (both sides of an addition) reaches a contraction."""
    seen = set() if seen is None else seen
    while depth > 0 and isinstance(node, fx.Node) and node not in seen:
        seen.add(node)
        depth -= 1
        if is_contraction(node):
            return True
        add = nodes.tensor_add(node)
        if add is not None:  # (b + s) + mask: the scores may be on either side, at any depth
            return _leads_to_contraction(add[0], depth, seen) or _leads_to_contraction(add[1], depth, seen)
        nxt = nodes.cast_input(node) or (nodes.scalar_scale(node) or (None,))[0]
        if nxt is None:
            m = nodes.mask_op(node)
            nxt = m.scores if m else (nodes.self_arg(node) if nodes.is_tanh(node) else None)
        node = nxt
    return False


def _apply_steps(qk: QK, scores: fx.Node, steps: list[fx.Node]) -> _ScoreState:
    state = _ScoreState(qk.alpha)
    if qk.addend is not None:
        state.add_bias(qk.addend, qk.beta)
    prev = scores
    for node in steps:
        if nodes.cast_input(node) is not None:
            pass
        elif (scaled := nodes.scalar_scale(node)) is not None:
            state.scale_by(scaled[1])
        elif (add := nodes.tensor_add(node)) is not None:
            a, b, coeff = add
            if a is prev:
                state.add_bias(b, coeff)
            elif b is prev and coeff == 1.0:
                state.add_bias(a, 1.0)
            else:
                raise Refusal("scores are subtracted from a tensor")
            if not _same_shape(node, scores):
                raise Refusal("a bias broadcasts the scores to a larger shape")
        elif (mask := nodes.mask_op(node)) is not None:
            if not _same_shape(node, scores):
                raise Refusal("a mask broadcasts the scores to a larger shape")
            state.mask(mask)
        elif nodes.is_tanh(node):
            state.tanh()
        prev = node
    return state


def _walk_probs(softmax: fx.Node) -> tuple[PV, fx.Node, float]:
    """From softmax forward to P @ V through casts and dropout."""
    node, dropout_p = softmax, 0.0
    for _ in range(MAX_WALK):
        _single_user(node, "the attention weights")
        user = next(u for u in node.users if not _reads_dtype_only(u, node))
        if is_contraction(user):
            pv = read_pv(user)
            if pv.p is not node:
                raise Refusal("the attention weights are the right operand of the second contraction")
            return pv, user, dropout_p
        if nodes.cast_input(user) is node:
            node = user
            continue
        drop = nodes.dropout(user)
        if drop is not None and drop.input is node:
            if drop.active:
                if dropout_p:
                    raise Refusal("two dropouts on the attention weights")
                dropout_p = drop.p
            node = user
            continue
        raise Refusal(f"unsupported op between softmax and P·V: {nodes.describe(user)}")
    raise Refusal("no second contraction after softmax")


def _strip_scalar_scale(op: Operand) -> tuple[Operand, float]:
    """q * c or k * c before the product folds into the scale (the mul node itself stays if used elsewhere)."""
    factor = 1.0
    node = op.node
    while (scaled := nodes.scalar_scale(node)) is not None and isinstance(scaled[1], float) and scaled[1] > 0:
        node, c = scaled
        factor *= c
    return Operand(node, op.perm), factor


def match_site(softmax_node: fx.Node) -> Match:
    """Raise Refusal (with the reason) unless the softmax is a fusable attention."""
    sm = nodes.softmax(softmax_node)
    score_ev = nodes.fake(sm.input)
    if sm.dim != score_ev.dim() - 1:
        raise Refusal(f"softmax over axis {sm.dim} of a rank-{score_ev.dim()} tensor, not the key axis")
    qk, scores, steps = _walk_scores(sm.input)
    state = _apply_steps(qk, scores, steps)
    pv, out_node, dropout_p = _walk_probs(softmax_node)
    q, fq = _strip_scalar_scale(qk.q)
    k, fk = _strip_scalar_scale(qk.k)
    scale, softcap = state.scale_and_softcap()
    # A factor on q or k scales only the product, not the biases added after it.
    scale *= fq * fk
    match = Match(
        softmax=softmax_node, out_node=out_node, q=q, k=k, v=pv.v, scores_rank=score_ev.dim(),
        scale=scale, softcap=softcap, biases=state.biases, masks=state.masks,
        mask_fill=state.fill if state.fill is not None else -math.inf, dropout_p=dropout_p,
        symbolic_scale=state.symbolic, out_perm=pv.out_perm,
    )
    _check_served(match)
    _native_gqa(match)
    return match


def _check_served(m: Match) -> None:
    q, k, v = (nodes.fake(o.node) for o in (m.q, m.k, m.v))
    if not (q.dtype == k.dtype == v.dtype):
        raise Refusal(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in SERVED_DTYPES:
        raise Refusal(f"dtype {q.dtype} is not served (float16, bfloat16, float32)")
    if q.device.type not in SERVED_DEVICES:
        raise Refusal(f"device {q.device.type} is not served (cpu, cuda)")
    for b in m.biases:
        ev = nodes.fake(b.node)
        if not ev.dtype.is_floating_point or ev.device != q.device or ev.dim() > m.scores_rank:
            raise Refusal(f"bias of dtype {ev.dtype} and shape {list(ev.shape)} is not served")
    for mk in m.masks:
        ev = nodes.fake(mk.cond)
        if ev.device != q.device or ev.dim() > m.scores_rank:
            raise Refusal(f"mask of shape {list(ev.shape)} is not served")


def _native_gqa(m: Match) -> None:
    """Drop repeat_kv / repeat_interleave on K and V when both repeat by the same factor."""
    if m.k.perm is not None or m.v.perm is not None:
        return
    rk, rv = read_repeat(m.k.node), read_repeat(m.v.node)
    if rk is None or rv is None or not statically_known_true(rk.groups == rv.groups) or rk.how != rv.how:
        return
    m.k, m.v = Operand(rk.source, None), Operand(rv.source, None)
    m.gqa_groups, m.gqa_source = rk.groups, rk.how


def is_attention_like(softmax_node: fx.Node) -> bool:
    """Contractions on both sides of the softmax (through any ops): worth a refusal record."""
    sm = nodes.softmax(softmax_node)
    if sm is None:
        return False
    before = _reaches(sm.input, lambda n: [a for a in n.all_input_nodes])
    after = _reaches(softmax_node, lambda n: list(n.users), skip_self=True)
    return before and after


def _reaches(start: fx.Node, step, skip_self: bool = False) -> bool:
    frontier, seen = [start], set()
    for _ in range(MAX_WALK // 4):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if is_contraction(n) and not (skip_self and n is start):
                return True
            nxt.extend(step(n))
        frontier = nxt
    return False


def find_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, Union[Match, Refusal]]]:
    """Every attention-like softmax in the graph with its match or its refusal."""
    found = []
    for node in list(gm.graph.nodes):
        if nodes.softmax(node) is None:
            continue
        try:
            found.append((node, match_site(node)))
        except Refusal as refusal:
            if is_attention_like(node):
                found.append((node, refusal))
            else:
                log.debug("softmax %s has no contraction around it: not attention", node.name)
    return found
