"""Host time of the fused backward op on the GPU: where a training step's attention backward
spends its CPU time (profile_step.py showed it at several times cuDNN's).

At a tiny shape (the kernels take a few µs, so back-to-back calls measure the host), it times
the op's implementation (``ops.dispatch.backward``), its validation alone (``backward_call``),
and SDPA's forward+backward for scale; then cProfile of ``--n`` backward calls by own time.

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/host_backward.py
"""
from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import time

import torch

CAUSAL = "j <= i + (N - M)"


def per_call_us(fn, n: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    import fusepass  # noqa: F401
    from fusepass.ops import dispatch

    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 1, args.seq, args.head_dim, device=dev, dtype=dt) for _ in range(3))
    fwd = (q, k, v, [], [], None, args.head_dim ** -0.5, 0.0, 0.0, -math.inf, CAUSAL, [])
    out, lse = dispatch.forward(*fwd)
    g = torch.randn_like(out)
    bwd_args = (g, q, k, v, out, lse, [], [], None, args.head_dim ** -0.5, 0.0, 0.0, -math.inf, CAUSAL, [], [], "")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def sdpa_step():
        torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(g)

    rows = [
        ("fusepass backward (ops.dispatch.backward)", lambda: dispatch.backward(*bwd_args)),
        ("  its validation alone (dispatch.backward_call)", lambda: dispatch.backward_call(*bwd_args)),
        ("fusepass forward (ops.dispatch.forward)", lambda: dispatch.forward(*fwd)),
        ("SDPA forward + backward, eager", sdpa_step),
        ("torch.empty of q's shape", lambda: torch.empty_like(q)),
    ]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B=1 H=1 N={args.seq} "
          f"D={args.head_dim} bf16 causal; µs a call, back to back ({args.n} calls)\n")
    print("| what | µs a call |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {per_call_us(fn, args.n):.1f} |", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.n):
        dispatch.backward(*bwd_args)
    prof.disable()
    torch.cuda.synchronize()
    print(f"\ncProfile of {args.n} backward calls, by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
