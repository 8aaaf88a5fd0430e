"""Memory-efficient PyTorch reference for the fused attention op (CPU, and GPU where Triton can't serve).

Notation as in ``attention.py``: q [B, Hq, M, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], Hq = G * Hkv.

The work is tiled over queries (``bm`` rows) and keys (``bn`` columns); a tile's scores are
the only score-sized buffer alive at a time, so memory is O(B * Hq * bm * bn), never M x N.
GQA is native: q is viewed as [B, Hkv, G, M, D] and the G query heads that share a kv head
are folded into the row dimension of one matmul, [B, Hkv, G * bm, D] @ [B, Hkv, D, bn].
That fold also makes the backward's reduction of dk/dv over the group a plain matmul.

Forward is an online softmax (running row max and sum); backward is FlashAttention-2 style:
it recomputes each tile's probabilities from the saved lse, with D = rowsum(dO * O) and
dS = P * (dP - D).  Everything is computed in fp32 (fp64 for fp64 inputs), upcast per tile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fusepass.call import AttentionCall, BackwardCall, out_tensor
from fusepass.masks import predicate
from fusepass.ops.dropout import keep_mask

log = logging.getLogger(__name__)

# Tile sizes.  A tile holds B * Hq * bm * bn scores; a few fp32 temporaries of that size exist
# at once (scores, probabilities, tanh, keep).  bm shrinks below BLOCK_M (to at least
# MIN_BLOCK_M) when B * Hq is large, so that one tile stays within MAX_TILE_SCORES elements.
BLOCK_M = 256  # queries per tile (per query head)
BLOCK_N = 1024  # keys per tile
MIN_BLOCK_M = 16  # below this, per-tile Python overhead dominates on long sequences
MAX_TILE_SCORES = 2**24  # 64 MiB per fp32 temporary

# The saved lse is fp32.  Where it cannot be trusted to reproduce P exactly we recompute the
# row statistics in the backward (see _row_normalizers): always for fp64 inputs, and for fp32
# rows whose |lse| exceeds this limit.  Such rows come from large finite fills (finfo.min,
# -1e4): there fp32 rounds fill + log(N) to fill and exp(s - lse) would give 1 instead of 1/N.
# At 128 the fp32 ulp is 7.6e-6, i.e. a relative error in P close to eager's own.
LSE_EXACT_LIMIT = 128.0
# Recomputed statistics are used only where they agree with the saved lse to this relative
# tolerance (8 fp32 ulps); otherwise the lse came from elsewhere (ring attention's global lse)
# and is used as given.
LSE_MATCH_RTOL = 2.0**-20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_5d(t: Tensor, Hkv: int, G: int) -> Tensor:
    """A tensor broadcastable to [B, Hq, M, N] as a view broadcastable to [B, Hkv, G, M, N]."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    if t.shape[1] == 1:
        return t.unsqueeze(2)  # [b, 1, 1, m, n]
    return t.unflatten(1, (Hkv, G))  # [b, Hkv, G, m, n]


def _tile(t5: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """Rows i0:i1 and columns j0:j1 of a 5-D broadcastable view (size-1 dims stay as they are)."""
    rows = slice(i0, i1) if t5.shape[3] != 1 else slice(None)
    cols = slice(j0, j1) if t5.shape[4] != 1 else slice(None)
    return t5[:, :, :, rows, cols]


@dataclass
class _Problem:
    """One call's inputs in tile-friendly views, and the recipe for a tile's scores."""

    q5: Tensor  # [B, Hkv, G, M, D]
    k: Tensor  # [B, Hkv, N, D]
    v: Tensor  # [B, Hkv, N, Dv]
    biases5: list[Tensor]  # each broadcastable to [B, Hkv, G, M, N]
    masks5: list[Tensor]  # bool, each broadcastable to [B, Hkv, G, M, N]
    seed: int
    scale: float
    softcap: float
    dropout_p: float
    mask_fill: float
    mask_expr: str
    mask_args: list[int]
    cdt: torch.dtype  # compute dtype
    bm: int
    bn: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        B, Hkv, G, M, _ = self.q5.shape
        return B, Hkv, G, M, self.k.shape[2]

    def q_tile(self, i0: int, i1: int) -> Tensor:
        B, Hkv, G, _, _ = self.shape
        # [B, Hkv, G * (i1 - i0), D]: the G heads sharing a kv head become rows of one matmul.
        # The scale is applied here, to bm x D values, rather than to the bm x bn scores.
        D = self.q5.shape[-1]
        return (self.q5[:, :, :, i0:i1].to(self.cdt) * self.scale).reshape(B, Hkv, G * (i1 - i0), D)

    def keep(self, i0: int, i1: int, j0: int, j1: int) -> Optional[Tensor]:
        """AND of the bool masks and the predicate on this tile; None when nothing is masked."""
        keep = None
        for m5 in self.masks5:
            t = _tile(m5, i0, i1, j0, j1)
            keep = t if keep is None else keep & t
        if self.mask_expr:
            B, Hkv, G, M, N = self.shape
            dev = self.q5.device
            env = dict(
                b=torch.arange(B, device=dev).view(B, 1, 1, 1, 1),
                h=torch.arange(Hkv * G, device=dev).view(1, Hkv, G, 1, 1),
                i=torch.arange(i0, i1, device=dev).view(1, 1, 1, -1, 1),
                j=torch.arange(j0, j1, device=dev).view(1, 1, 1, 1, -1),
                M=M,
                N=N,
            )
            env.update({f"a{n}": int(a) for n, a in enumerate(self.mask_args)})
            pred = torch.as_tensor(predicate.evaluate_torch(self.mask_expr, **env), device=dev)
            if pred.dtype != torch.bool:
                raise ValueError(
                    f"fusepass.attention: mask predicate {self.mask_expr!r} gives {pred.dtype}, not bool"
                )
            keep = pred if keep is None else keep & pred
        return keep

    def dropout_scale(self, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """keep_mask / (1 - p) on this tile, [B, Hkv, G, bm, bn] in the compute dtype."""
        B, Hkv, G, M, _ = self.shape
        dev = self.q5.device
        b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
        h = torch.arange(Hkv * G, device=dev).view(1, Hkv, G, 1, 1)
        i = torch.arange(i0, i1, device=dev).view(1, 1, 1, -1, 1)
        rows = (b * (Hkv * G) + h) * M + i  # [B, Hkv, G, bm, 1]; the row numbering of dropout.py
        cols = torch.arange(j0, j1, device=dev)  # [bn]
        z = keep_mask(self.seed, rows, cols, self.dropout_p)
        return z.to(self.cdt) * (1.0 / (1.0 - self.dropout_p))

    def scores(self, qt: Tensor, keep: Optional[Tensor], i0: int, i1: int, j0: int, j1: int):
        """Masked scores [B, Hkv, G, bm, bn], tanh of the capped scores (or None), the k tile."""
        B, Hkv, G, _, _ = self.shape
        kt = self.k[:, :, j0:j1].to(self.cdt)  # [B, Hkv, bn, D]
        s = torch.matmul(qt, kt.transpose(-1, -2)).view(B, Hkv, G, i1 - i0, j1 - j0)
        t = None
        if self.softcap > 0:
            t = torch.tanh(s / self.softcap)
            s = t * self.softcap
        for b5 in self.biases5:
            s.add_(_tile(b5, i0, i1, j0, j1).to(self.cdt))
        if keep is not None:
            s.masked_fill_(~keep, self.mask_fill)  # replaced, not added: as eager's masked_fill
        return s, t, kt

    def skippable(self, keep: Optional[Tensor]) -> bool:
        """A tile whose scores are all -inf contributes exactly nothing (for rows with a finite lse)."""
        return keep is not None and self.mask_fill == float("-inf") and not bool(keep.any())


def _problem(call: AttentionCall) -> _Problem:
    # The call was validated when it was built (fusepass/call.py).
    q, k, v, seed = call.q, call.k, call.v, call.seed
    B, Hq, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv if Hkv else 1
    bn = max(1, min(BLOCK_N, N))
    bm = max(MIN_BLOCK_M, MAX_TILE_SCORES // max(1, B * Hq * bn))
    bm = max(1, min(BLOCK_M, bm, M))
    return _Problem(
        q5=q.unflatten(1, (Hkv, G)),
        k=k,
        v=v,
        biases5=[_as_5d(b, Hkv, G) for b in call.biases],
        masks5=[_as_5d(m, Hkv, G) for m in call.masks],
        seed=int(seed) if seed is not None else 0,
        scale=call.scale,
        softcap=call.softcap,
        dropout_p=call.dropout_p,
        mask_fill=call.mask_fill,
        mask_expr=call.mask_expr,
        mask_args=list(call.mask_args),
        cdt=_compute_dtype(q.dtype),
        bm=bm,
        bn=bn,
    )


def _online_softmax(pb: _Problem, qt: Tensor, i0: int, i1: int, with_values: bool):
    """Row max (with -inf replaced by 0), row sum and, if asked, the unnormalized P @ V of rows i0:i1.

    Shapes: m, l [B, Hkv, G, bm, 1]; acc [B, Hkv, G * bm, Dv] or None.
    """
    B, Hkv, G, _, N = pb.shape
    bm = i1 - i0
    dev = qt.device
    m = torch.full((B, Hkv, G, bm, 1), float("-inf"), dtype=pb.cdt, device=dev)
    m_safe = torch.zeros_like(m)
    l = torch.zeros_like(m)
    acc = torch.zeros((B, Hkv, G * bm, pb.v.shape[-1]), dtype=pb.cdt, device=dev) if with_values else None
    for j0 in range(0, N, pb.bn):
        j1 = min(j0 + pb.bn, N)
        keep = pb.keep(i0, i1, j0, j1)
        if pb.skippable(keep):
            continue  # e.g. causal attention's tiles above the diagonal
        s, _, _ = pb.scores(qt, keep, i0, i1, j0, j1)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # A row with nothing visible so far has max -inf; shifting by 0 keeps exp() at 0, not NaN.
        m_new_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = s.sub_(m_new_safe).exp_()  # in place: this tile's scores are not needed again
        alpha = torch.exp(m - m_new_safe)  # rescales what was summed under the old max
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        if with_values:
            if pb.dropout_p > 0:
                p = p * pb.dropout_scale(i0, i1, j0, j1)
            vt = pb.v[:, :, j0:j1].to(pb.cdt)  # [B, Hkv, bn, Dv]
            pv = torch.matmul(p.view(B, Hkv, G * bm, j1 - j0), vt)
            acc = acc * alpha.view(B, Hkv, G * bm, 1) + pv
        m, m_safe = m_new, m_new_safe
    return m_safe, l, acc


def attention_forward(call: AttentionCall):
    """Returns (out [B, Hq, M, Dv] in v.dtype, lse fp32 [B, Hq, M]); see attention.py for the semantics."""
    q, v = call.q, call.v
    B, Hq, M, _ = q.shape
    if call.empty:
        # No rows, or no keys: eager's softmax over zero keys is an empty row, so P @ V is a sum
        # of nothing (zeros) and logsumexp is -inf.  (Also keeps views of empty tensors, which
        # cannot be reshaped with a -1, out of the tiling.)
        return (out_tensor(torch.zeros, B, Hq, M, v.shape[-1], dtype=v.dtype, device=q.device),
                torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device))
    pb = _problem(call)
    B, Hkv, G, M, N = pb.shape
    Dv = v.shape[-1]
    log.debug("reference forward: B=%d Hkv=%d G=%d M=%d N=%d tiles %dx%d %s", B, Hkv, G, M, N, pb.bm, pb.bn, pb.cdt)
    out = out_tensor(torch.empty, B, Hkv * G, M, Dv, dtype=v.dtype, device=q.device)
    lse = torch.empty((B, Hkv * G, M), dtype=torch.float32, device=q.device)
    out5, lse5 = out.view(B, Hkv, G, M, Dv), lse.view(B, Hkv, G, M)
    for i0 in range(0, M, pb.bm):
        i1 = min(i0 + pb.bm, M)
        m_safe, l, acc = _online_softmax(pb, pb.q_tile(i0, i1), i0, i1, with_values=True)
        # l == 0 (nothing visible under -inf fill) gives 0/0 = NaN, as eager's softmax does.
        out5[:, :, :, i0:i1] = (acc.view(B, Hkv, G, i1 - i0, Dv) / l).to(v.dtype)
        lse5[:, :, :, i0:i1] = (m_safe + torch.log(l)).squeeze(-1).to(torch.float32)
    return out, lse


def _row_normalizers(pb: _Problem, qt: Tensor, i0: int, i1: int, lse_t: Tensor):
    """(shift, norm) such that P = exp(s - shift) * norm for rows i0:i1, each [B, Hkv, G, bm, 1].

    Normally shift = lse.  Where the fp32 lse is too coarse (fp64 inputs, or |lse| beyond
    LSE_EXACT_LIMIT) the row max and sum are recomputed in the compute dtype and used instead,
    provided they reproduce the saved lse (else it is a global lse from elsewhere; use it).
    """
    lse_c = lse_t.to(pb.cdt)
    one = torch.ones_like(lse_c)
    coarse = torch.isfinite(lse_c) & (lse_c.abs() > LSE_EXACT_LIMIT)
    if pb.cdt != torch.float64 and not bool(coarse.any()):
        return lse_c, None
    m_safe, l, _ = _online_softmax(pb, qt, i0, i1, with_values=False)
    local = (m_safe + torch.log(l)).to(torch.float32).to(pb.cdt)
    agree = (local - lse_c).abs() <= LSE_MATCH_RTOL * torch.maximum(lse_c.abs(), one)
    return torch.where(agree, m_safe, lse_c), torch.where(agree, 1.0 / l, one)


def _accumulate_bias_grad(acc5: Tensor, ds: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
    """Add the tile's score gradient ds [B, Hkv, G, bm, bn], summed over the bias's broadcast dims."""
    dims = [d for d in range(5) if acc5.shape[d] == 1 and ds.shape[d] != 1]
    g = ds.sum(dim=dims, keepdim=True) if dims else ds
    _tile(acc5, i0, i1, j0, j1).add_(g)


def attention_backward(bcall: BackwardCall):
    """Returns dq, dk, dv (like q, k, v) and, per bias, its gradient (or an empty tensor if not flagged).

    Fully masked rows get what eager autograd gives for softmax(where(keep, s, fill)): where()
    passes zero gradient to replaced scores, so such a row's dq and its share of dk and of the
    bias grads are 0.  With a finite fill the row's P is uniform, so dv still receives dO / N.
    With -inf fill the row's P is NaN; eager's dv = P^T @ dO is then NaN for every key of that
    (batch, kv head), and so is ours (the same NaN propagates; we do not skip tiles there).
    A row whose every score is -inf because of biases is NaN in eager too, and its unmasked
    scores pass NaN on to dq, dk and the bias gradients: so do ours (ds is NaN there).
    """
    call = bcall.forward
    q, k, v, biases, bias_needs_grad = call.q, call.k, call.v, call.biases, bcall.bias_needs_grad
    grad_out, out, lse = bcall.grad_out, bcall.out, bcall.lse
    if call.empty:
        # No score exists: every gradient is a sum of nothing.
        dbiases = [torch.zeros_like(b, memory_format=torch.contiguous_format) if need else b.new_empty((0,))
                   for b, need in zip(biases, bias_needs_grad)]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbiases
    pb = _problem(call)
    B, Hkv, G, M, N = pb.shape
    D, Dv = q.shape[-1], v.shape[-1]
    cdt = pb.cdt
    dev = q.device
    log.debug("reference backward: B=%d Hkv=%d G=%d M=%d N=%d tiles %dx%d %s", B, Hkv, G, M, N, pb.bm, pb.bn, cdt)
    do5 = grad_out.unflatten(1, (Hkv, G))  # [B, Hkv, G, M, Dv]
    o5 = out.unflatten(1, (Hkv, G))
    lse5 = lse.unflatten(1, (Hkv, G)).unsqueeze(-1)  # [B, Hkv, G, M, 1]
    dq = torch.empty_like(q)
    dq5 = dq.unflatten(1, (Hkv, G))
    dk_acc = torch.zeros((B, Hkv, N, D), dtype=cdt, device=dev)
    dv_acc = torch.zeros((B, Hkv, N, Dv), dtype=cdt, device=dev)
    dbias_acc = [
        torch.zeros(b.shape, dtype=cdt, device=dev) if need else None for b, need in zip(biases, bias_needs_grad)
    ]
    dbias5 = [_as_5d(a, Hkv, G) if a is not None else None for a in dbias_acc]

    for i0 in range(0, M, pb.bm):
        i1 = min(i0 + pb.bm, M)
        bm = i1 - i0
        qt = pb.q_tile(i0, i1)  # [B, Hkv, G * bm, D], already scaled
        dot = do5[:, :, :, i0:i1].to(cdt).reshape(B, Hkv, G * bm, Dv)
        ot = o5[:, :, :, i0:i1].to(cdt).reshape(B, Hkv, G * bm, Dv)
        delta = (dot * ot).sum(dim=-1).view(B, Hkv, G, bm, 1)  # D_i = rowsum(dO * O)
        lse_t = lse5[:, :, :, i0:i1]
        shift, norm = _row_normalizers(pb, qt, i0, i1, lse_t)
        # Skipping an all-masked tile is exact only if its P is 0, not NaN (see the docstring).
        can_skip = bool(torch.isfinite(lse_t).all())
        dqt = torch.zeros((B, Hkv, G * bm, D), dtype=cdt, device=dev)
        for j0 in range(0, N, pb.bn):
            j1 = min(j0 + pb.bn, N)
            bn = j1 - j0
            keep = pb.keep(i0, i1, j0, j1)
            if can_skip and pb.skippable(keep):
                continue
            s, t, kt = pb.scores(qt, keep, i0, i1, j0, j1)
            p = s.sub_(shift).exp_()  # [B, Hkv, G, bm, bn]
            if norm is not None:
                p = p * norm
            vt = pb.v[:, :, j0:j1].to(cdt)  # [B, Hkv, bn, Dv]
            dp = torch.matmul(dot, vt.transpose(-1, -2)).view(B, Hkv, G, bm, bn)
            if pb.dropout_p > 0:
                z = pb.dropout_scale(i0, i1, j0, j1)
                p_used, dp = p * z, dp * z
            else:
                p_used = p
            # Summing over the G * bm rows reduces dv over the query heads of the group.
            dv_acc[:, :, j0:j1] += torch.matmul(p_used.view(B, Hkv, G * bm, bn).transpose(-1, -2), dot)
            # The gradient of the masked scores; 0 where p == 1 exactly (a one-hot row at fp32
            # resolution, whose true ds is below 2^-24 |dp|: dp - delta is only rounding there).
            ds = torch.where(p == 1.0, 0.0, p * (dp - delta))
            if keep is not None:
                ds.masked_fill_(~keep, 0.0)  # replaced scores pass no gradient back
            for acc5 in dbias5:
                if acc5 is not None:
                    _accumulate_bias_grad(acc5, ds, i0, i1, j0, j1)
            if t is not None:
                ds = ds * (1.0 - t * t)  # d/dx [c * tanh(x / c)]
            ds2 = ds.view(B, Hkv, G * bm, bn)
            dqt += torch.matmul(ds2, kt)
            dk_acc[:, :, j0:j1] += torch.matmul(ds2.transpose(-1, -2), qt)  # qt carries the scale
        dq5[:, :, :, i0:i1] = (dqt * pb.scale).view(B, Hkv, G, bm, D).to(q.dtype)

    dk = torch.empty_like(k).copy_(dk_acc)
    dv = torch.empty_like(v).copy_(dv_acc)
    dbiases = [
        torch.empty_like(b).copy_(a) if a is not None else b.new_empty((0,)) for b, a in zip(biases, dbias_acc)
    ]
    return dq, dk, dv, dbiases
