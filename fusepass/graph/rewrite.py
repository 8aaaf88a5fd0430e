"""Rewrite: replace a matched site by one call of ``torch.ops.fusepass.attention``.

New nodes go right before the P·V node, where every operand already exists.  They are
views (permute, unsqueeze, expand), at most a scalar multiply per bias with a coefficient
and a logical_not per ``masked_fill`` condition; the repeated K/V of GQA, the scores and
the attention weights become dead and are removed.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import attention as _op  # noqa: F401  (registers torch.ops.fusepass)
from ..spec import AttentionSpec
from . import nodes, predicates
from .contractions import Operand, Refusal
from .matcher import Match

LAYOUTS = {4: "[B, H, N, D]", 3: "[B*H, N, D]", 2: "[N, D]"}


def _eq(a, b) -> bool:
    return statically_known_true(a == b)


def _to_rank4(graph: fx.Graph, node: fx.Node, rank: int) -> fx.Node:
    """[B*H, N, D] -> [B*H, 1, N, D]; [N, D] -> [1, 1, N, D] (views)."""
    ev = nodes.fake(node)
    if rank == 3 and ev.dim() == 3:
        return graph.call_method("unsqueeze", (node, 1))
    if rank == 2:
        for _ in range(4 - ev.dim()):
            node = graph.call_method("unsqueeze", (node, 0))
        return node
    return node


def _operand(graph: fx.Graph, op: Operand, rank: int) -> fx.Node:
    node = op.node
    if op.perm is not None:
        node = graph.call_function(torch.permute, (node, op.perm))
    return _to_rank4(graph, node, rank)


def _shape4(op: Operand, rank: int) -> tuple:
    shape = op.shape()
    return (1,) * (4 - len(shape)) + shape if rank != 3 else (shape[0], 1) + shape[1:]


def op_shapes(m: Match) -> tuple[tuple, tuple, tuple]:
    return tuple(_shape4(o, m.scores_rank) for o in (m.q, m.k, m.v))


def check_batch(m: Match) -> tuple[bool, bool, bool]:
    """Which views K and V need to share q's batch and one kv-head count: (batch K, heads K, heads V)."""
    (B, Hq, _, _), (Bk, Hk, _, _), (Bv, Hv, _, _) = op_shapes(m)
    for name, b in (("K", Bk), ("V", Bv)):
        if not (_eq(b, B) or _eq(b, 1)):
            raise Refusal(f"{name} batch {b} does not match q batch {B}")
    if not (_eq(Bk, Bv)):
        raise Refusal(f"K and V batches differ ({Bk}, {Bv})")
    if not (_eq(Hk, Hv) or _eq(Hk, 1) or _eq(Hv, 1)):
        raise Refusal(f"K and V head counts differ ({Hk}, {Hv})")
    hkv = Hv if _eq(Hk, 1) else Hk
    if not isinstance(hkv, int) or not isinstance(Hq, int) or Hq % hkv:
        raise Refusal(f"{Hq} query heads do not group over {hkv} key/value heads")
    return (not _eq(Bk, B)), (not _eq(Hk, hkv)), (not _eq(Hv, hkv))


def describe(m: Match, location: str) -> AttentionSpec:
    qs, ks, vs = op_shapes(m)
    q_ev = nodes.fake(m.q.node)
    hkv = ks[1] if not _eq(ks[1], 1) else vs[1]
    groups = qs[1] // hkv
    source = m.gqa_source or ("broadcast" if groups > 1 else "")
    return AttentionSpec(
        layout=LAYOUTS[m.scores_rank], q_shape=qs, k_shape=ks, v_shape=vs,
        dtype=str(q_ev.dtype).replace("torch.", ""), device=q_ev.device.type,
        scale=m.scale * math.prod(f.hint() for f in m.symbolic_scale), softcap=m.softcap, dropout_p=m.dropout_p, gqa_groups=groups, gqa_source=source,
        bias_shapes=tuple(tuple(nodes.fake(b.node).shape) for b in m.biases),
        bias_requires_grad=tuple(bool(nodes.fake(b.node).requires_grad) for b in m.biases),
        mask=predicates.description(m), mask_fill=m.mask_fill,
        skipped_fraction=predicates.skipped_fraction(m, qs[2], ks[2]),
    )


def rewrite(gm: fx.GraphModule, m: Match, expand: tuple[bool, bool, bool]) -> None:
    graph = gm.graph
    rank = m.scores_rank
    with graph.inserting_before(m.out_node):
        q = _operand(graph, m.q, rank)
        for factor in m.symbolic_scale:
            q = graph.call_function(operator.mul if factor.power == 1 else operator.truediv, (q, factor.node))
        k, v = _operand(graph, m.k, rank), _operand(graph, m.v, rank)
        batch, heads_k, heads_v = expand
        if batch:
            b = graph.call_method("size", (q, 0))
            k, v = (graph.call_method("expand", (t, b, -1, -1, -1)) for t in (k, v))
        if heads_k:
            k = graph.call_method("expand", (k, -1, graph.call_method("size", (v, 1)), -1, -1))
        if heads_v:
            v = graph.call_method("expand", (v, -1, graph.call_method("size", (k, 1)), -1, -1))
        biases = []
        for b in m.biases:
            node = _to_rank4(graph, b.node, rank)
            if b.coeff != 1.0:
                node = graph.call_function(operator.mul, (node, b.coeff))
            biases.append(node)
        masks = []
        for mk in m.masks:
            node = _to_rank4(graph, mk.cond, rank)
            masks.append(node if mk.keep_when else graph.call_function(torch.logical_not, (node,)))
        seed = None
        if m.dropout_p > 0:
            seed = graph.call_function(torch.randint, (0, 2**31 - 1, ()), {"dtype": torch.int64, "device": "cpu"})
        call = graph.call_function(
            torch.ops.fusepass.attention.default,
            (q, k, v, biases, masks, seed, float(m.scale), float(m.softcap), float(m.dropout_p),
             float(m.mask_fill), m.mask_expr, list(m.mask_args)),
        )
        out = graph.call_function(operator.getitem, (call, 0))
        if rank == 3:
            out = graph.call_method("squeeze", (out, 1))
        elif rank == 2:
            out = graph.call_function(operator.getitem, (out, (0, 0)))
    m.out_node.replace_all_uses_with(out)
