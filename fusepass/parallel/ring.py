"""Ring attention: the op's forward and backward when its run string asks for context parallelism.

Each of W ranks holds its shard of q, k, v ([B, H, L, D], L = S / W; positions as layout.py
says).  Forward: at step t = 0 .. W-1 the rank holds the K/V chunk of rank (r - t) mod W (the
next one already in flight: exchange.py), runs the op on every (query segment, key segment)
pair whose predicate may show something, with the predicate on global positions
(global_predicate.py), and merges the partial outputs by their lse (merge.py).

Backward: the same ring.  Each pair's gradients come from the op's own backward given the
*merged* out and lse: it recomputes P = exp(s - lse) with the global lse and uses
delta = rowsum(dO * O) of the merged output, so dS = P * (dP - delta) is the global dS
restricted to the pair, and the pairs' gradients add up to the exact ones.  dq adds up
locally; dk/dv partials travel with their chunk and reach its owner after W hops.

Key-padding masks ([B, 1, 1, N]) travel with their K/V chunk; biases and dropout are refused
(their values are the local shard's: sites.py refuses them at compile time already).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator

import torch
from torch import Tensor

from fusepass.call import AttentionCall, BackwardCall

from . import global_predicate, group, layout, merge
from .exchange import Ring

log = logging.getLogger(__name__)


def _fail(msg: str):
    raise ValueError(f"fusepass.attention (context parallel): {msg}")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One call's ring: who holds what, and the predicate every pair evaluates."""

    call: AttentionCall
    ring: Ring
    layout: str
    global_expr: str
    may_skip: bool  # pairs that hide everything may be left out

    @property
    def local_len(self) -> int:
        return self.call.q_len

    def segments(self, rank: int) -> tuple[layout.Segment, ...]:
        return layout.segments(self.layout, rank, self.ring.world, self.local_len)

    def pairs(self, source: int) -> Iterator[tuple[layout.Segment, layout.Segment, tuple]]:
        """(query segment, key segment of ``source``'s chunk, the pair's mask_args)."""
        total = self.ring.world * self.local_len
        for qs in self.segments(self.ring.rank):
            for ks in self.segments(source):
                if not self.global_expr:
                    yield qs, ks, self.call.mask_args
                    continue
                args = global_predicate.pair_args(self.call.mask_args, qs.start, ks.start, total, total)
                if self.may_skip and global_predicate.hides_all(self.global_expr, args, qs.length, ks.length):
                    continue
                yield qs, ks, args

    def pair_call(self, chunk: list[Tensor], qs: layout.Segment, ks: layout.Segment, args: tuple) -> AttentionCall:
        c = self.call
        k, v, masks = _unpack(chunk)
        masks = [m if m.shape[-1] == 1 else m[..., ks.rows] for m in masks]
        return AttentionCall.build(
            c.q[:, :, qs.rows], k[:, :, ks.rows], v[:, :, ks.rows], (), masks, None, scale=c.scale,
            softcap=c.softcap, mask_fill=c.mask_fill, mask_expr=self.global_expr, mask_args=args,
            run=c.run.local())


def _plan(call: AttentionCall, lse: Tensor | None = None, ring=None) -> _Plan:
    if call.biases or call.dropout_p > 0:
        _fail("biases and dropout are not supported (their values are the local shard's)")
    if call.q_len != call.kv_len:
        _fail(f"q holds {call.q_len} positions and k {call.kv_len}: the sequence of q, k and v must be sharded alike")
    ring = ring or Ring(group.resolve(call.run.cp_group))
    # A pair that hides everything adds exactly nothing to a row that sees some key elsewhere:
    # weight exp(lse_pair - lse) = 0 under a -inf or a finite fill alike (finite-fill rows that
    # see no key at all are not exact anyway: docs/architecture.md).  In the backward a row that
    # sees no key at all makes dv NaN for every key of its (batch, kv head), as eager does:
    # every pair must then run.
    may_skip = lse is None or bool(torch.isfinite(lse).all())
    expr = global_predicate.on_global_positions(call.mask_expr, len(call.mask_args))
    return _Plan(call, ring, call.run.cp_layout, expr, may_skip)


def _key_masks(call: AttentionCall) -> list[Tensor]:
    """The call's masks as 4-D key masks, as uint8 (what every backend can send)."""
    out = []
    for m in call.masks:
        m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        if m4.shape[2] != 1:
            _fail(f"a mask tensor of shape {tuple(m.shape)} varies over queries; only key masks [B, 1, 1, N] are "
                  "supported")
        out.append(m4.contiguous().view(torch.uint8))
    return out


def _unpack(chunk: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    k, v, *masks = chunk
    return k, v, [m.view(torch.bool) for m in masks]


def forward(call: AttentionCall, attend: Callable[[AttentionCall], tuple[Tensor, Tensor]],
            ring=None) -> tuple[Tensor, Tensor]:
    """(out, lse) of this rank's queries over the whole sequence; ``attend`` runs one pair.
    ``ring``: the call's group's Ring unless given (benchmarks/bench_ring.py simulates one)."""
    if call.empty:
        return attend(dataclasses.replace(call, run=call.run.local()))
    plan = _plan(call, ring=ring)
    ring = plan.ring
    q_segs = plan.segments(ring.rank)
    acc: list = [None] * len(q_segs)
    chunk = [call.k, call.v, *_key_masks(call)]
    for step in range(ring.world):
        pending = ring.shift(chunk) if step < ring.world - 1 else None  # overlaps this step's work
        for qs, ks, args in plan.pairs(ring.source(step)):
            out, lse = attend(plan.pair_call(chunk, qs, ks, args))
            n = q_segs.index(qs)
            acc[n] = merge.add(acc[n], out, lse)
        if pending is not None:
            chunk = pending.wait()
    B, H, _, _ = call.q.shape
    parts = [merge.finish(a, (B, H, s.length, call.v_head_dim), call.v.dtype, call.q.device)
             for a, s in zip(acc, q_segs)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2)


def backward(bcall: BackwardCall, attend_backward: Callable[[BackwardCall], tuple], ring=None) -> tuple:
    """(dq, dk, dv, []) of this rank's shard; ``attend_backward`` runs one pair's backward."""
    call = bcall.forward
    if call.empty:
        local = dataclasses.replace(call, run=call.run.local())
        return attend_backward(dataclasses.replace(bcall, forward=local))
    plan = _plan(call, bcall.lse, ring)
    ring = plan.ring
    acc_dtype = torch.float64 if call.q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(call.q.shape, dtype=acc_dtype, device=call.q.device)
    # The gradients of the chunk this rank holds, travelling with it.
    grads = [torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (call.k, call.v)]
    chunk = [call.k, call.v, *_key_masks(call)]
    for step in range(ring.world):
        pending = ring.shift(chunk) if step < ring.world - 1 else None
        for qs, ks, args in plan.pairs(ring.source(step)):
            rows = qs.rows
            pair = BackwardCall.build(plan.pair_call(chunk, qs, ks, args), bcall.grad_out[:, :, rows],
                                      bcall.out[:, :, rows], bcall.lse[:, :, rows])
            dq_p, dk_p, dv_p, _ = attend_backward(pair)
            dq[:, :, rows] += dq_p
            grads[0][:, :, ks.rows] += dk_p
            grads[1][:, :, ks.rows] += dv_p
        if pending is not None:
            chunk = pending.wait()
        if ring.world > 1:
            # After the last step the chunk's gradients go home: rank r then holds rank r's.
            grads = ring.shift(grads).wait()
    dk, dv = grads
    return (torch.empty_like(call.q).copy_(dq), torch.empty_like(call.k).copy_(dk),
            torch.empty_like(call.v).copy_(dv), [])
