"""In-place writes in a Dynamo graph, and whether a site may be fused around them.

Dynamo keeps in-place ops as they were written: ``buf.add_(1)`` is a node with no users,
and later reads of ``buf`` name the original node, so program order alone says which value
each read sees.  The rewrite changes two things, and this module checks both:

* It reads values differently.  The matcher and the mask reader interpret nodes (a scale, a
  mask built with ``torch.full``) as if their values were the ones they were created with.
  A write into any interpreted node's storage breaks that, so such a site is refused (or, for
  a mask, read as data instead).  The exception is an in-place op on a fresh tensor that
  nothing else reads (``x += y`` on a temporary): it is the functional op in disguise.
* It moves reads.  The fused op reads q, k, v, biases and masks where P·V was, not where
  Q·Kᵀ was; a write into one of them in between would be seen by the op and not by eager.

Aliasing comes from the fake tensors Dynamo recorded: views share their base's storage.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from . import nodes
from .contractions import Refusal

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}
# Ops that read only their tensor argument's metadata (shape, dtype, device), never values.
_METADATA_METHODS = {
    "size", "dim", "ndimension", "numel", "stride", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_tensor", "get_device", "element_size", "is_contiguous",
}
_METADATA_FUNCTIONS = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.numel,
}


def storage(node: Any) -> Optional[int]:
    """Identity of the memory a node's (fake) tensor lives in, or None; views share it.

    The fake tensors stay alive for the whole compile, so the address is a stable key.
    """
    ev = nodes.fake(node)
    if ev is None:
        return None
    try:
        return StorageWeakRef(ev.untyped_storage()).cdata
    except (RuntimeError, NotImplementedError):  # e.g. sparse or nested example values
        return None


def _inplace_flag_position(target: Any) -> Optional[int]:
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def written(node: fx.Node) -> list[fx.Node]:
    """The tensor nodes that ``node`` writes into (empty for a functional op)."""
    if node.op not in ("call_function", "call_method"):
        return []
    target = node.target
    out: list[Any] = []
    if node.op == "call_method":
        if isinstance(target, str) and target.endswith("_") and not target.startswith("__"):
            out.append(node.args[0] if node.args else None)
    elif target in _INPLACE_OPERATORS or target is operator.setitem:
        out.append(node.args[0])
    elif isinstance(target, torch._ops.OpOverload):
        for a, value in zip(target._schema.arguments, node.args):
            if a.alias_info is not None and a.alias_info.is_write:
                out.append(value)
    else:
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and node.args:
            out.append(node.args[0])  # torch.relu_, torch.Tensor.add_, ...
        pos = _inplace_flag_position(target) if callable(target) else None
        flag = node.kwargs.get("inplace", node.args[pos] if pos is not None and len(node.args) > pos else False)
        if flag is True and node.args:
            out.append(node.args[0])
    dest = node.kwargs.get("out")
    out.extend(dest if isinstance(dest, (tuple, list)) else [dest])
    return [x for x in out if nodes.fake(x) is not None]


def _value_inputs(node: fx.Node) -> Iterable[fx.Node]:
    """Inputs whose values (not only metadata) ``node`` reads."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return node.all_input_nodes[1:]
    if node.op == "call_function" and node.target in _METADATA_FUNCTIONS:
        return node.all_input_nodes[1:]
    if node.op == "call_method" and node.target in ("type_as", "to") and len(node.args) > 1:
        return [node.args[0]]  # x.type_as(y) / x.to(y) read y's dtype only
    if node.op == "call_function" and node.target is getattr:
        return []  # x.shape, x.dtype, ...
    return node.all_input_nodes


# Set by GraphWrites on in-place writes into a private temporary; remove_dead erases those.
PRIVATE = "fusepass_private_write"


class GraphWrites:
    """Every in-place write in one graph, with positions, built once per compile."""

    def __init__(self, graph: fx.Graph):
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        self._storage = {n: storage(n) for n in graph.nodes}
        self.writes: list[tuple[fx.Node, int]] = []
        for n in graph.nodes:
            targets = written(n)
            for t in targets:
                key = self._storage.get(t)
                if key is not None:
                    self.writes.append((n, key))
            if len(targets) == 1 and self._is_private(n, targets[0]):
                n.meta[PRIVATE] = True

    def _is_private(self, w: fx.Node, t: fx.Node) -> bool:
        """``t += x`` on a temporary that nothing else can see: every node sharing t's memory
        is t itself or comes from w, so reading w as the functional op is exact."""
        key = self._storage.get(t)
        if key is None or t.op not in ("call_function", "call_method") or set(t.users) != {w}:
            return False
        after, stack = set(), [w]
        while stack:
            n = stack.pop()
            if n not in after:
                after.add(n)
                stack.extend(n.users)
        return all(n is t or n in after for n, k in self._storage.items() if k == key)

    def __bool__(self) -> bool:
        return bool(self.writes)

    def check(self, match, leaves: list[fx.Node]) -> None:
        """Refuse (with the reason) unless fusing ``match`` reads what eager reads.

        ``leaves``: the nodes the op will take as tensor arguments.
        """
        if not self.writes:
            return
        interpreted = _interpreted(match.out_node, set(leaves))
        storage_of = self._storage.get
        leaf_storage = {storage_of(x) for x in leaves} - {None}
        for w, key in self.writes:
            if w in interpreted:
                if w.meta.get(PRIVATE):
                    continue
                raise Refusal(
                    f"{w.name} ({nodes.describe(w)}) writes in place into a tensor others can see; "
                    f"the site would read it as the functional op"
                )
            if key in leaf_storage:
                continue  # a write into an argument: the ordering check below decides
            hit = next((n for n in interpreted if storage_of(n) == key), None)
            if hit is not None:
                raise Refusal(
                    f"{w.name} ({nodes.describe(w)}) writes in place into {hit.name}, which the "
                    f"site reads as part of the attention"
                )
        end = self.position[match.out_node]
        for x in leaves:
            key = storage_of(x)
            if key is None:
                continue
            readers = [n for n in interpreted if x in n.all_input_nodes or storage_of(n) == key]
            if not readers:
                continue
            start = min(self.position[n] for n in readers)
            for w, wkey in self.writes:
                if wkey == key and start < self.position[w] < end:
                    raise Refusal(
                        f"{w.name} ({nodes.describe(w)}) writes into {x.name} between the two "
                        f"contractions: the fused op would read the written value"
                    )


def _interpreted(out_node: fx.Node, leaves: set[fx.Node]) -> set[fx.Node]:
    """The nodes whose values the site's description was read from: everything P·V depends
    on, stopping at the op's tensor arguments and at metadata-only reads."""
    seen: set[fx.Node] = set()
    stack = [out_node]
    while stack:
        n = stack.pop()
        if n in seen or n in leaves:
            continue
        seen.add(n)
        stack.extend(_value_inputs(n))
    return seen


def leaves_of(match) -> list[fx.Node]:
    """The tensors the rewrite hands to the op for ``match``."""
    out = [match.q.node, match.k.node, match.v.node]
    out += [b.node for b in match.biases] + [mk.cond for mk in match.masks]
    out += [f.node for f in match.symbolic_scale]
    out += [a for a in match.mask_args if isinstance(a, fx.Node)]
    return out


def remove_dead(graph: fx.Graph, start: fx.Node) -> None:
    """Erase ``start`` and what only it kept alive; never an op with a visible effect.

    The rewrite may remove only what it made dead: nodes that were dead before it (an
    in-place write whose result is unused) are never reached from here.
    """
    stack = [start]
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        if written(n):
            if not n.meta.get(PRIVATE):
                continue
        elif n.is_impure():
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)
