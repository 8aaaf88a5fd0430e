"""Rewrite: replace a matched site by one call of ``torch.ops.fusepass.attention``.

New nodes go right before the P·V node, where every operand already exists.  They are
views (permute, unsqueeze, expand), at most a scalar multiply per bias with a coefficient
and a logical_not per ``masked_fill`` condition; the repeated K/V of GQA, the scores and
the attention weights become dead and are removed (only what the rewrite made dead: see
``mutations.remove_dead``).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import attention as _op  # noqa: F401  (registers torch.ops.fusepass)
from ..spec import AttentionSpec
from . import mutations, nodes, predicates
from .contractions import Operand, Refusal
from .matcher import Match

LAYOUTS = {4: "[B, H, N, D]", 3: "[B*H, N, D]", 2: "[N, D]"}


def _eq(a, b) -> bool:
    return statically_known_true(a == b)


def _same_size(a, b) -> bool:
    """Equal for every input, or equal in the traced example and then guarded so.

    Two graph inputs get separate symbols even when their sizes always agree (k and v after a
    graph break); the op needs them equal, so the compiled graph is guarded on it, and Dynamo
    recompiles if a call ever breaks it.
    """
    if _eq(a, b):
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    if nodes.size_hint(a) != nodes.size_hint(b):
        return False
    return bool(a == b)  # records the guard


def _to_rank4(graph: fx.Graph, node: fx.Node, rank: int, ndim: int) -> fx.Node:
    """[B*H, N, D] -> [B*H, 1, N, D]; [N, D] -> [1, 1, N, D] (views).

    ``ndim`` is the node's rank, passed in because nodes made here carry no example value.
    """
    if rank == 3 and ndim == 3:
        return graph.call_method("unsqueeze", (node, 1))
    if rank == 2:
        for _ in range(4 - ndim):
            node = graph.call_method("unsqueeze", (node, 0))
        return node
    return node


def _compact(graph: fx.Graph, b) -> fx.Node:
    """where(AND of the data masks, 0, fill) in the bias's dtype, on the masks' own shape
    (Bias.compact): the same values as the tensor the code built, broadcast."""
    masks, fill = b.compact
    keep = None
    for node, invert in masks:
        shows = graph.call_function(torch.logical_not, (node,)) if invert else graph.call_function(torch.ne, (node, 0))
        keep = shows if keep is None else graph.call_function(torch.logical_and, (keep, shows))
    value = graph.call_function(torch.where, (keep, 0.0, fill))
    return graph.call_method("to", (value, nodes.fake(b.node).dtype))


def _operand(graph: fx.Graph, op: Operand, rank: int) -> fx.Node:
    node = op.node
    if op.perm is not None:
        node = graph.call_function(torch.permute, (node, op.perm))
    return _to_rank4(graph, node, rank, op.ndim)


def _shape4(op: Operand, rank: int) -> tuple:
    shape = op.shape()
    return (1,) * (4 - len(shape)) + shape if rank != 3 else (shape[0], 1) + shape[1:]


def trainable(m: Match) -> bool:
    """Whether a site's output needs grad (something it reads requires grad, with grad mode on).
    Dynamo guards every input's requires_grad and the grad mode, so what the example value says
    holds for every call this graph serves."""
    out = nodes.fake(m.out_node)
    return out is None or out.requires_grad


def _forward_op(m: Match):
    """The op a site calls: ``attention_inference`` (no autograd layer) unless it is trainable."""
    return torch.ops.fusepass.attention.default if trainable(m) else torch.ops.fusepass.attention_inference.default


def op_shapes(m: Match) -> tuple[tuple, tuple, tuple]:
    return tuple(_shape4(o, m.scores_rank) for o in (m.q, m.k, m.v))


def _scores_shape4(m: Match) -> tuple:
    shape = tuple(nodes.fake(nodes.softmax(m.softmax).input).shape)
    return (1,) * (4 - len(shape)) + shape if m.scores_rank != 3 else (shape[0], 1) + shape[1:]


def check_batch(m: Match) -> tuple[bool, bool, bool]:
    """Which views K and V need to share q's batch and one kv-head count: (batch K, heads K, heads V).

    Sizes may be symbolic (Dynamo's second compile after a shape change).  The scores' own
    shape says what eager's broadcasting produced; q must already have it.  K/V heads then
    equal q's, are 1, or are q's divided by a repeat the matcher stripped: the op maps query
    head h to kv head h // (Hq // Hkv) and checks divisibility on every call.
    """
    (B, Hq, _, _), (Bk, Hk, _, _), (Bv, Hv, _, _) = op_shapes(m)
    Bs, Hs, _, _ = _scores_shape4(m)
    if not (_same_size(Bs, B) and _same_size(Hs, Hq)):
        raise Refusal(f"q [{B}, {Hq}, ...] is broadcast to the scores' [{Bs}, {Hs}, ...]")
    for name, b in (("K", Bk), ("V", Bv)):
        if not (_eq(b, 1) or _same_size(b, B)):
            raise Refusal(f"{name} batch {b} does not match q batch {B}")
    if not (_same_size(Bk, Bv)):
        raise Refusal(f"K and V batches differ ({Bk}, {Bv})")
    if not (_eq(Hk, 1) or _eq(Hv, 1) or _same_size(Hk, Hv)):
        raise Refusal(f"K and V head counts differ ({Hk}, {Hv})")
    hkv = Hv if _eq(Hk, 1) else Hk
    if isinstance(hkv, int) and isinstance(Hq, int) and Hq % hkv:
        raise Refusal(f"{Hq} query heads do not group over {hkv} key/value heads")
    return (not _eq(Bk, B)), (not _eq(Hk, hkv)), (not _eq(Hv, hkv))


def _groups(hq, hkv):
    """Query heads per kv head: an int, or its expression when the sizes are symbolic."""
    if isinstance(hq, int) and isinstance(hkv, int):
        return hq // hkv
    if _eq(hq, hkv):
        return 1
    return str(hq // hkv)


def describe(m: Match, location: str) -> AttentionSpec:
    qs, ks, vs = op_shapes(m)
    q_ev = nodes.fake(m.q.node)
    hkv = ks[1] if not _eq(ks[1], 1) else vs[1]
    groups = _groups(qs[1], hkv)
    source = m.gqa_source or ("broadcast" if groups != 1 else "")
    return AttentionSpec(
        layout=LAYOUTS[m.scores_rank], q_shape=qs, k_shape=ks, v_shape=vs,
        dtype=str(q_ev.dtype).replace("torch.", ""), device=q_ev.device.type,
        scale=m.scale * math.prod(f.hint() for f in m.symbolic_scale), softcap=m.softcap, dropout_p=m.dropout_p, gqa_groups=groups, gqa_source=source,
        bias_shapes=tuple(b.shape() for b in m.biases),
        # Dynamo compiles under the grad mode it traced in: under no_grad no bias gets a gradient.
        bias_requires_grad=tuple(bool(nodes.fake(b.node).requires_grad) and torch.is_grad_enabled() for b in m.biases),
        mask=predicates.description(m), mask_fill=m.mask_fill,
        skipped_fraction=predicates.skipped_fraction(m, qs[2], ks[2]),
    )


def _resolve(m: Match, replaced: dict) -> None:
    """A site may read an earlier site's output (stacked layers): point it at the new node."""
    get = lambda n: replaced.get(n, n)  # noqa: E731
    m.q, m.k, m.v = (Operand(get(o.node), o.perm) for o in (m.q, m.k, m.v))
    for b in m.biases:
        b.node = get(b.node)
    for mk in m.masks:
        mk.cond = get(mk.cond)


def rewrite(gm: fx.GraphModule, m: Match, expand: tuple[bool, bool, bool], replaced: dict, run: str = "") -> None:
    """Replace the site by one op call; ``replaced`` maps earlier sites' outputs to their new
    nodes; ``run`` is the compile's RunOptions, encoded (the op's last argument)."""
    graph = gm.graph
    rank = m.scores_rank
    _resolve(m, replaced)
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
            node = _to_rank4(graph, _compact(graph, b) if b.compact else b.node, rank, len(b.shape()))
            if b.coeff != 1.0:
                node = graph.call_function(operator.mul, (node, b.coeff))
            biases.append(node)
        masks = []
        for mk in m.masks:
            node = _to_rank4(graph, mk.cond, rank, nodes.fake(mk.cond).dim())
            masks.append(node if mk.keep_when else graph.call_function(torch.logical_not, (node,)))
        seed = None
        if m.dropout_p > 0:
            seed = graph.call_function(torch.randint, (0, 2**31 - 1, ()), {"dtype": torch.int64, "device": "cpu"})
        call = graph.call_function(
            _forward_op(m),
            (q, k, v, biases, masks, seed, float(m.scale), float(m.softcap), float(m.dropout_p),
             float(m.mask_fill), m.mask_expr, list(m.mask_args), run),
        )
        out = graph.call_function(operator.getitem, (call, 0))
        if rank == 3:
            out = graph.call_method("squeeze", (out, 1))
        elif rank == 2:
            out = graph.call_function(operator.getitem, (out, (0, 0)))
        if m.out_perm is not None:
            out = graph.call_function(torch.permute, (out, m.out_perm))
    # The output stands for P·V from here on: later sites (stacked layers) read its shape.
    out.meta.update(m.out_node.meta)
    m.out_node.replace_all_uses_with(out)
    replaced[m.out_node] = out
    mutations.remove_dead(graph, m.out_node)
