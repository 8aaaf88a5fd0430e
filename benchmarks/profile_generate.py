"""Where a decode step's time goes under generate(): fusepass (eager-attention model) beside the
SDPA model, both under torch.compile, through torch.profiler.

The model and prompts are bench_generate.py's (Llama-style, GQA, random weights, greedy).  After
one warm-up generate() per variant, a second one runs under the profiler; printed per variant:
wall time per new token, the CPU time of the ops that cost the most (self time), the GPU time
by kernel, and the launches per decode step (kernels and host-side ops per token).

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/profile_generate.py [--batch 1] [--cache dynamic]
    PYTHONPATH=$PWD python benchmarks/profile_generate.py --tiny --device cpu     # smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench_generate as bg  # benchmarks/ is the script's directory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache", default="dynamic", choices=("dynamic", "static"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--python", action="store_true",
                    help="also cProfile one generate() (Python functions by own time), and time one after gc.freeze()")
    ap.add_argument("--variants", default="fusepass,sdpa")
    args = ap.parse_args()
    big = dict(hidden=2048, layers=8, heads=32, kv_heads=8, vocab=32000, prompt=2048)
    tiny = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, prompt=16)
    for k, v in (tiny if args.tiny else big).items():
        setattr(args, k, v)
    import fusepass  # noqa: F401  (registers the backend)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch._dynamo.config.cache_size_limit = 64
    ids, mask = bg.prompts(args, args.batch, device)
    gen_cfg = bg.generation(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    variants = (("fusepass", "eager", {"backend": "fusepass"}), ("sdpa", "sdpa", {}))
    for variant, attn, kw in (v for v in variants if v[0] in args.variants.split(",")):
        model = bg.build(args, attn).to(device, dtype)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, **kw)
        cache = bg.static_cache(model, args, args.batch) if args.cache == "static" else None
        bg.run(model, ids, mask, gen_cfg, device, cache)  # compiles
        t0 = time.perf_counter()
        bg.run(model, ids, mask, gen_cfg, device, cache)
        per_token = (time.perf_counter() - t0) / args.new_tokens * 1e3
        with profile(activities=activities) as prof:
            bg.run(model, ids, mask, gen_cfg, device, cache)
        steps = args.new_tokens - 1
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernel"))
        print(f"\n== {variant}: {per_token:.2f} ms per new token (B={args.batch}, {args.cache} cache, "
              f"{args.layers} layers); {launches / steps:.0f} kernel launches per decode step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if device.type == "cuda":
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        if args.python:
            python_profile(lambda: bg.run(model, ids, mask, gen_cfg, device, cache), args)
        del model, cache


def python_profile(generate, args) -> None:
    """Python's own view of one generate(): functions by their own time (what torch.profiler
    books as an op's self time), then the time per token with the collector's objects frozen
    (whether garbage collection of the compiled model's objects weighs on a step)."""
    import cProfile
    import gc
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    generate()
    prof.disable()
    print(f"\n-- cProfile of one generate() ({args.new_tokens} new tokens), by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows + 10)
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    generate()
    print(f"-- after gc.freeze(): {(time.perf_counter() - t0) / args.new_tokens * 1e3:.2f} ms per new token")
    gc.unfreeze()


if __name__ == "__main__":
    main()
