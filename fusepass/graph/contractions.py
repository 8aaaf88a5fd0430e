"""Contractions: read matmul / bmm / baddbmm / einsum into Q·Kᵀ and P·V with checked axes.

Each operand comes back as an ``Operand``: a node plus the permutation that puts it in the
op's canonical layout ([batch..., rows, features]).  Axes are checked from the graph's shape
metadata and from the views that produced an operand, never from op names alone: when an
operand is a transpose/permute of some tensor S, its feature axis must be S's last axis
(the projection's output features).  A K permuted so that its keys are contracted instead
(legal whenever N == D) is refused.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .nodes import arg, fake, is_call, scalar_value, self_arg


class Refusal(Exception):
    """Raised by readers when a candidate is attention-like but not safe to fuse."""


class Operand(NamedTuple):
    node: fx.Node
    perm: Optional[tuple[int, ...]]  # torch.permute(node, perm) is the canonical layout; None = as is

    @property
    def ndim(self) -> int:
        return fake(self.node).dim()

    def shape(self) -> tuple:
        s = tuple(fake(self.node).shape)
        return s if self.perm is None else tuple(s[p] for p in self.perm)


class QK(NamedTuple):
    """scores = alpha * (q @ kᵀ) + beta * addend, with q [batch.., M, D] and k [batch.., N, D]."""

    q: Operand
    k: Operand
    alpha: float
    addend: Optional[fx.Node]
    beta: float


class PV(NamedTuple):
    """out = p @ v with p [batch.., M, N] (softmax axis contracted) and v [batch.., N, Dv].

    ``out_perm``: an einsum may lay its output out in another order ("bhij,bjhd->bihd");
    permuting [batch.., M, Dv] by it gives the user's layout.  None = as is.
    """

    p: fx.Node
    v: Operand
    out_perm: Optional[tuple[int, ...]] = None


_MATMUL = (torch.matmul, operator.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm)


def is_contraction(node) -> bool:
    return is_call(node, *_MATMUL, torch.baddbmm, torch.Tensor.baddbmm, torch.einsum,
                   methods=("matmul", "bmm", "baddbmm", "__matmul__"))


# ---------------------------------------------------------------- views
def view_perm(node: fx.Node) -> Optional[tuple[fx.Node, tuple[int, ...]]]:
    """If ``node`` is a pure axis permutation of another tensor S: (S, perm) with out axis a = S axis perm[a]."""
    if not isinstance(node, fx.Node):
        return None
    src = self_arg(node)
    ev = fake(src)
    if ev is None:
        return None
    n = ev.dim()
    if is_call(node, torch.transpose, torch.swapaxes, torch.swapdims, torch.Tensor.transpose,
               methods=("transpose", "swapaxes", "swapdims")):
        d0, d1 = node.args[1], node.args[2]
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return None
        perm = list(range(n))
        perm[d0 % n], perm[d1 % n] = perm[d1 % n], perm[d0 % n]
        return src, tuple(perm)
    if is_call(node, torch.permute, torch.Tensor.permute, methods=("permute",)):
        dims = node.args[1:] if node.op == "call_method" else (node.args[1],) if len(node.args) > 1 else (node.kwargs.get("dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if len(dims) != n or not all(isinstance(d, int) for d in dims):
            return None
        return src, tuple(d % n for d in dims)
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("mT", "T") and n >= 2:
        if node.args[1] == "T" and n != 2:
            return None
        perm = list(range(n))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return src, tuple(perm)
    return None


def check_feature_axis(op: Operand, what: str) -> None:
    """The operand's canonical last axis must be its source's last axis when it is a permuted view."""
    axis = op.perm[-1] if op.perm is not None else op.ndim - 1
    seen = view_perm(op.node)
    if seen is None:
        return
    src, perm = seen
    if perm[axis] != fake(src).dim() - 1:
        raise Refusal(
            f"contraction axes do not line up: {what} contracts axis {perm[axis]} of a permuted "
            f"tensor of shape {list(fake(src).shape)} instead of its last (feature) axis"
        )


def _swap_last(n: int) -> tuple[int, ...]:
    perm = list(range(n))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return tuple(perm)


def key_from_transposed(b: fx.Node) -> Operand:
    """K in [batch.., N, D] from the right operand of q @ b, where b is [batch.., D, N]."""
    n = fake(b).dim()
    seen = view_perm(b)
    if seen is not None:
        src, perm = seen
        if perm == _swap_last(n):
            return Operand(src, None)
        if perm[-2] != n - 1:
            raise Refusal(
                f"contraction axes do not line up: K is permuted by {list(perm)} so the contracted "
                f"axis is not its last (feature) axis"
            )
    return Operand(b, _swap_last(n))


# ---------------------------------------------------------------- readers
def _matmul_operands(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    if is_call(node, *_MATMUL, methods=("matmul", "bmm", "__matmul__")):
        a = self_arg(node)
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other", node.kwargs.get("mat2"))
        return a, b
    return None


def read_qk(node: fx.Node) -> Optional[QK]:
    """Read the first contraction; None if ``node`` is not a contraction at all."""
    mm = _matmul_operands(node)
    if mm is not None:
        a, b = mm
        _check_ranks(a, b)
        qk = QK(Operand(a, None), key_from_transposed(b), 1.0, None, 0.0)
    elif is_call(node, torch.baddbmm, torch.Tensor.baddbmm, methods=("baddbmm",)):
        addend, a, b = self_arg(node), arg(node, 1, "batch1"), arg(node, 2, "batch2")
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        beta, alpha = scalar_value(beta), scalar_value(alpha)
        if beta is None or alpha is None:
            raise Refusal("baddbmm with a non-constant alpha or beta")
        _check_ranks(a, b)
        # beta == 0: torch never reads the addend (it may be torch.empty garbage).
        qk = QK(Operand(a, None), key_from_transposed(b), alpha, addend if beta != 0 else None, beta)
    elif is_call(node, torch.einsum):
        eq, ops = _einsum_args(node)
        q_perm, k_perm = _einsum_qk(eq, ops)
        qk = QK(Operand(ops[0], q_perm), Operand(ops[1], k_perm), 1.0, None, 0.0)
    else:
        return None
    check_feature_axis(qk.q, "Q")
    check_feature_axis(qk.k, "K")
    return qk


def read_pv(node: fx.Node) -> Optional[PV]:
    mm = _matmul_operands(node)
    if mm is not None:
        p, v = mm
        _check_ranks(p, v)
        pv = PV(p, Operand(v, None))
    elif is_call(node, torch.einsum):
        eq, ops = _einsum_args(node)
        v_perm, out_perm = _einsum_pv(eq, ops)
        pv = PV(ops[0], Operand(ops[1], v_perm), out_perm)
    elif is_contraction(node):
        raise Refusal(f"second contraction {node.target} is not of the form P @ V")
    else:
        return None
    check_feature_axis(pv.v, "V")
    return pv


def _check_ranks(a, b) -> None:
    fa, fb = fake(a), fake(b)
    if fa is None or fb is None:
        raise Refusal("contraction operand without shape metadata")
    if fa.dim() < 2 or fb.dim() < 2 or fa.dim() > 4 or fb.dim() > 4:
        raise Refusal(f"contraction of ranks {fa.dim()} and {fb.dim()} (served: 2 to 4)")


# ---------------------------------------------------------------- einsum
def _einsum_args(node: fx.Node) -> tuple[str, list]:
    eq, rest = node.args[0], list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    if not isinstance(eq, str) or len(rest) != 2 or not all(fake(r) is not None for r in rest):
        raise Refusal("einsum that is not a two-operand contraction")
    return eq.replace(" ", ""), rest


def _expand_ellipsis(eq: str, ops: list) -> tuple[list[str], str]:
    if "->" not in eq:
        raise Refusal("einsum without an explicit output")
    ins, out = eq.split("->")
    terms = ins.split(",")
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    n_ell = 0
    for term, op in zip(terms, ops):
        if "..." in term:
            n_ell = max(n_ell, fake(op).dim() - (len(term) - 3))
    ell = "".join(spare[:n_ell])
    expanded = []
    for term, op in zip(terms, ops):
        if "..." in term:
            k = fake(op).dim() - (len(term) - 3)
            term = term.replace("...", ell[n_ell - k:])
        expanded.append(term)
    return expanded, out.replace("...", ell)


def _einsum_split(eq: str, ops: list):
    """The axes of a two-operand einsum read from its subscripts, whatever their letters and order:
    (lhs, rhs, out, contracted axis, lhs's free axis, rhs's free axis)."""
    (lhs, rhs), out = _expand_ellipsis(eq, ops)
    if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs) or len(set(out)) != len(out):
        raise Refusal("einsum with a repeated index (diagonal)")
    contracted = [c for c in lhs if c in rhs and c not in out]
    free_l = [c for c in lhs if c not in rhs]
    free_r = [c for c in rhs if c not in lhs]
    batch = [c for c in lhs if c in rhs and c in out]
    if len(contracted) != 1 or len(free_l) != 1 or len(free_r) != 1:
        raise Refusal(f"einsum {eq!r} is not one contraction with one free axis per operand")
    if sorted(out) != sorted(batch + free_l + free_r):
        raise Refusal(f"einsum {eq!r} sums over an axis of one operand only")
    return lhs, rhs, out, contracted[0], free_l[0], free_r[0]


def _perm(term: str, order: list[str]) -> Optional[tuple[int, ...]]:
    perm = tuple(term.index(c) for c in order)
    return None if perm == tuple(range(len(term))) else perm


def _einsum_qk(eq: str, ops: list):
    """Scores must come out as [batch.., i, j] (softmax over the last axis reads keys); q and k
    may be laid out in any order ("bihd,bjhd->bhij")."""
    lhs, rhs, out, d, i, j = _einsum_split(eq, ops)
    batch = list(out[:-2])
    if out[-2:] != i + j:
        raise Refusal(f"einsum {eq!r}: scores are not laid out as [batch.., queries, keys]")
    return _perm(lhs, batch + [i, d]), _perm(rhs, batch + [j, d])


def _einsum_pv(eq: str, ops: list):
    """P must be read in its own layout [batch.., i, j]; V and the output may be in any order
    ("bhij,bjhd->bihd"). Returns (V's permutation, the output's permutation)."""
    lhs, rhs, out, j, i, d = _einsum_split(eq, ops)
    batch = list(lhs[:-2])
    if lhs[-2:] != i + j:
        raise Refusal(f"einsum {eq!r}: P is not laid out as [batch.., queries, keys]")
    return _perm(rhs, batch + [j, d]), _perm("".join(batch + [i, d]), list(out))


# ---------------------------------------------------------------- GQA
class Repeat(NamedTuple):
    source: fx.Node  # [B, Hkv, N, D]
    groups: object  # an int, or a SymInt when Dynamo made the head counts dynamic
    how: str


def read_repeat(node: fx.Node) -> Optional[Repeat]:
    """``repeat_kv`` (index/unsqueeze at 2 + expand + reshape) or ``repeat_interleave(g, dim=1)``."""
    out = fake(node)
    if out is None or out.dim() != 4:
        return None
    if is_call(node, torch.repeat_interleave, torch.Tensor.repeat_interleave, methods=("repeat_interleave",)):
        src = self_arg(node)
        reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(reps, fx.Node):  # a symbolic count (q.shape[1] // k.shape[1] under dynamic shapes)
            reps = reps.meta.get("example_value")
        if not isinstance(reps, (int, torch.SymInt)) or not isinstance(dim, int) or dim % 4 != 1:
            return None
        s = fake(src)
        if s is None or not _same(out.shape, (s.shape[0], s.shape[1] * reps, *s.shape[2:])):
            return None
        return Repeat(src, reps, "repeat_interleave")
    if not is_call(node, torch.reshape, torch.Tensor.reshape, torch.Tensor.view,
                   methods=("reshape", "view", "flatten")):
        return None
    expanded = self_arg(node)
    if not is_call(expanded, torch.Tensor.expand, methods=("expand",)):
        return None
    ex = fake(expanded)
    unsq = self_arg(expanded)
    src = _unsqueezed_at_2(unsq)
    if src is None or ex is None or ex.dim() != 5:
        return None
    s = fake(src)
    B, Hkv, G, N, D = ex.shape
    if not (_same(s.shape, (B, Hkv, N, D)) and _same(out.shape, (B, Hkv * G, N, D))):
        return None
    return Repeat(src, G, "repeat_kv")


def _same(a, b) -> bool:
    """Shapes equal for every value of their symbols (never a guard)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _unsqueezed_at_2(node) -> Optional[fx.Node]:
    if is_call(node, torch.unsqueeze, torch.Tensor.unsqueeze, methods=("unsqueeze",)):
        if arg(node, 1, "dim") in (2, -3):
            return self_arg(node)
        return None
    if node is not None and getattr(node, "op", None) == "call_function" and node.target is operator.getitem:
        # k[:, :, None, :, :], and its shorter spellings k[:, :, None] and k[:, :, None, ...]:
        # one new axis at 2, every other entry a full slice (an Ellipsis only last).
        src, idx = node.args
        if isinstance(idx, tuple) and 3 <= len(idx) <= 5 and idx[2] is None:
            rest = list(idx[:2]) + list(idx[3:])
            if rest and rest[-1] is Ellipsis:
                rest.pop()
            if len(rest) <= 4 and all(isinstance(i, slice) and i == slice(None) for i in rest):
                return src
    return None
