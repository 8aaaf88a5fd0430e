"""Context parallelism's cost on one device: the ring's per-step kernels and LSE merge, simulated.

A ring over W ranks gives each rank S/W queries (torch's head-tail layout) and passes K/V round
it.  Here one process plays each rank in turn (``SimulatedRing``): its shifts hand over the
chunk the previous rank would send (forward) or a device copy of what it sends (backward, and
``--copies``: a stand-in for the transfer, which on several GPUs overlaps the work).  What is
timed is exactly what a rank runs: fusepass/parallel/ring.py with the op's own dispatch, so the
pairs take the same kernels as any call.  Per (S, W), against one call over the whole sequence:

  * ``single``: one forward (or forward + backward) over all S queries and keys;
  * ``ideal``: single / W (what W ranks would take with no ring cost);
  * ``rank max`` / ``rank mean``: a rank's ring, the slowest rank and the mean (a real ring
    steps at its slowest rank's pace);
  * ``merge``: the ring's own work with the kernels replaced by precomputed pair results
    (merge, slicing, copies, host time);
  * ``overhead``: rank max / ideal.

The forward of the simulation is checked against the single call (every rank's rows).

    PYTHONPATH=$PWD python benchmarks/bench_ring.py [--seqs 16384,65536] [--worlds 2,4,8]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from fusepass.call import AttentionCall, BackwardCall
from fusepass.ops import dispatch
from fusepass.options import RunOptions
from fusepass.parallel import layout, ring


class _Done:
    def __init__(self, tensors):
        self._tensors = tensors

    def wait(self):
        return self._tensors


@dataclasses.dataclass
class SimulatedRing:
    """Rank ``rank`` of ``world`` in one process.  ``chunks[r]``: what rank r sends first (its
    k, v and key masks); given, the forward's shifts return the right rank's chunk; not given,
    a shift returns a copy of what was sent (timing only: the values are not another rank's)."""

    rank: int
    world: int
    chunks: list | None = None
    shifts: int = 0

    def source(self, step: int) -> int:
        return (self.rank - step) % self.world

    def shift(self, tensors):
        self.shifts += 1
        if self.chunks is not None:
            return _Done([t.clone() for t in self.chunks[self.source(self.shifts)]])
        return _Done([t.clone() for t in tensors])


def bench_ms(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` (device-synchronized)."""
    cuda = torch.cuda.is_available()
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def call_of(q, k, v, expr: str, ring_layout: str | None = None) -> AttentionCall:
    """The op's call; ``ring_layout`` given, one that asks for a ring (its group is simulated)."""
    run = RunOptions(cp_group="simulated", cp_layout=ring_layout) if ring_layout else RunOptions()
    return AttentionCall.build(q, k, v, mask_expr=expr, run=run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="16384,65536")
    parser.add_argument("--worlds", default="2,4,8")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--masks", default="causal,none", help="causal (j <= i) and/or none")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (reference path)"
    print(f"# bench_ring on {name}, {dtype}, B=1, H={args.heads}, D={args.dim}; ms, median of {args.reps}")
    print("| mask | mode | S | W | single | ideal | rank max | rank mean | merge | overhead | fwd max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mask in args.masks.split(","):
        expr = {"causal": "j <= i", "none": ""}[mask]
        for S in (int(s) for s in args.seqs.split(",")):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, args.heads, S, args.dim, device=device, dtype=dtype) for _ in range(3))
            go = torch.randn_like(q)
            for mode in args.modes.split(","):
                single = _single(q, k, v, go, expr, mode)
                t_single = bench_ms(single, args.reps)
                for W in (int(w) for w in args.worlds.split(",")):
                    row = _ring_row(q, k, v, go, expr, mode, W, args.reps)
                    ideal = t_single / W
                    print(f"| {mask} | {mode} | {S} | {W} | {t_single:.3f} | {ideal:.3f} | {row['max']:.3f} | "
                          f"{row['mean']:.3f} | {row['merge']:.3f} | {row['max'] / ideal:.2f}x | {row['err']} |",
                          flush=True)


def _single(q, k, v, go, expr, mode):
    call = call_of(q, k, v, expr)

    def run():
        out, lse = dispatch.run_forward(call)
        if mode != "fwd":
            dispatch.run_backward(BackwardCall.build(call, go, out, lse))
    return run


def _ring_row(q, k, v, go, expr, mode, W, reps) -> dict:
    S = q.shape[2]
    pos = [layout.positions("head_tail", r, W, S, device=q.device) for r in range(W)]
    shard = [(q[:, :, p], k[:, :, p], v[:, :, p], go[:, :, p]) for p in pos]
    chunks = [[kr, vr] for _, kr, vr, _ in shard]
    times, merges, err = [], [], "-"
    full_out = dispatch.run_forward(call_of(q, k, v, expr))[0] if mode == "fwd" else None
    worst = 0.0
    for r in range(W):
        qr, kr, vr, gr = shard[r]
        call = call_of(qr, kr, vr, expr, "head_tail")
        if mode == "fwd":
            out, _ = ring.forward(call, dispatch.run_forward, SimulatedRing(r, W, chunks))
            worst = max(worst, (out.float() - full_out[:, :, pos[r]].float()).abs().max().item())
            times.append(bench_ms(lambda: ring.forward(call, dispatch.run_forward, SimulatedRing(r, W, chunks)),
                                  reps))
            cached = _cached(dispatch.run_forward)
            ring.forward(call, cached, SimulatedRing(r, W, chunks))
            merges.append(bench_ms(lambda: ring.forward(call, cached, SimulatedRing(r, W, chunks)), reps))
        else:
            def step(attend_f, attend_b):
                out, lse = ring.forward(call, attend_f, SimulatedRing(r, W, chunks))
                ring.backward(BackwardCall.build(call, gr, out, lse), attend_b, SimulatedRing(r, W))
            times.append(bench_ms(lambda: step(dispatch.run_forward, dispatch.run_backward), reps))
            cf, cb = _cached(dispatch.run_forward), _cached(dispatch.run_backward)
            step(cf, cb)
            merges.append(bench_ms(lambda: step(cf, cb), reps))
    if mode == "fwd":
        err = f"{worst:.2e}"
    return {"max": max(times), "mean": statistics.mean(times), "merge": max(merges), "err": err}


def _cached(attend):
    """``attend`` run once per pair (keyed by the pair's shapes and mask args), then replayed:
    what is left to time is the ring's own work."""
    memo: dict = {}

    def run(call):
        fwd = call.forward if isinstance(call, BackwardCall) else call
        key = (tuple(fwd.q.shape), tuple(fwd.k.shape), fwd.mask_args)
        if key not in memo:
            memo[key] = attend(call)
        return memo[key]
    return run


if __name__ == "__main__":
    main()
