"""Where a compiled decode step's time goes when it costs far more than its kernels: the
compiled site (bench_decode's code) against the op and dispatch.forward called directly, then
torch.profiler's table of the compiled site (every CPU op and CUDA kernel it runs).

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/host_decode.py [--shapes 8x4096,1x1024]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fusepass  # noqa: F401 (registers the backend and the ops)
from fusepass.ops import dispatch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import plain_attention  # noqa: E402  (the same model code)
from bench_overhead import per_call_us  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x4096,1x1024", help="BxN, comma-separated (Hq=32, Hkv=8, D=128)")
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        B, N = (int(x) for x in shape.split("x"))
        q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        f = torch.compile(lambda q, k, v: plain_attention(q, k, v, None), backend="fusepass",
                          options={"autotune": False}, dynamic=False)
        op_args = (q, k, v, [], [], None, 128 ** -0.5, 0.0, 0.0, -math.inf, "", [], "autotune=0")
        # A DynamicCache step: K/V one key longer per call (torch.cat makes them contiguous).
        cache_k, cache_v = (torch.randn(B, 8, N + 8 * args.n, 128, device="cuda", dtype=torch.bfloat16)
                            for _ in range(2))
        lengths = iter(range(N, N + 8 * args.n))

        def growing():
            n = next(lengths)
            ks, vs = cache_k[:, :, :n].contiguous(), cache_v[:, :, :n].contiguous()
            torch.cuda.synchronize()  # an empty queue: the launches never wait for room
            t0 = time.perf_counter()
            dispatch.forward(q, ks, vs, *op_args[3:])
            return time.perf_counter() - t0

        rows = [
            ("dispatch.forward", lambda: dispatch.forward(*op_args)),
            ("op attention_inference", lambda: torch.ops.fusepass.attention_inference.default(*op_args)),
            ("compiled site", lambda: f(q, k, v)),
            ("SDPA eager", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
        ]
        print(f"\n== B={B} N={N} Hq=32 Hkv=8 D=128 bf16; µs per call (back to back, median of 5 x {args.n})")
        with torch.no_grad():
            for name, fn in rows:
                print(f"| {name} | {per_call_us(fn, args.n, repeats=5):.1f} |", flush=True)
            f(q, k, v)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    f(q, k, v)
                torch.cuda.synchronize()
            growing(), growing(), growing()  # the second length binds the grower
            steps = sorted(growing() for _ in range(args.n))
            median = steps[len(steps) // 2] * 1e6
            print(f"| dispatch.forward, one key longer per call (host only, median) | {median:.1f} |")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
