"""Where a model's step spends its device time, fusepass beside the SDPA model under Inductor.

bench_e2e.py says how fast a step is; this says why: the same models and sizes (its arguments),
each variant's inference call or training step run under ``torch.profiler`` after a warm-up, and
the kernels that take the most device time printed per variant, with the step's total (on the
CPU, a smoke run: the ops' own CPU time).

    python benchmarks/profile_step.py --models gpt2 --mode train --no-autotune
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import bench_e2e


def device_us(event, cuda: bool = True) -> float:
    """An averaged event's device time in µs (the attribute's name differs across torch versions);
    on the CPU (a smoke run), its own CPU time."""
    for name in ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def host_table(prof, steps: int, top: int) -> None:
    """The ops that take the most host (CPU) time of their own, per step."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"host: {total / steps / 1e3:.3f} ms of ops' own CPU time a step")
    print("| op | own CPU µs a step | calls a step |")
    print("|---|---|---|")
    for e in events[:top]:
        print(f"| {e.key[:90]} | {e.self_cpu_time_total / steps:.1f} | {e.count / steps:g} |")


def profile(run: bench_e2e.ModelRun, variant: str, mode: str, steps: int, top: int, host_top: int) -> None:
    torch._dynamo.reset()
    module = run.module(variant)
    if module is None:
        print(f"{variant}: not built (see bench_e2e)")
        return
    module.train(mode == "train")
    model = bench_e2e.compile_variant(variant, module, run.args)
    infer, train = bench_e2e.step_fns(model, module, run.feed, run.projection)
    fn = infer if mode == "infer" else train
    cuda = run.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    walls = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
    activities = [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    if host_top or not cuda:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync()
    events = [e for e in prof.key_averages() if device_us(e, cuda) > 0]
    events.sort(key=lambda e: device_us(e, cuda), reverse=True)
    total = sum(device_us(e, cuda) for e in events)
    print(f"\n## {run.name} {mode}, {variant}: {statistics.median(walls) * 1e3:.3f} ms a step (wall, "
          f"median of 10), {total / steps / 1e3:.3f} ms of kernels")
    print("| kernel | µs a step | share | calls a step |")
    print("|---|---|---|---|")
    for e in events[:top]:
        us = device_us(e, cuda)
        print(f"| {e.key[:90]} | {us / steps:.1f} | {us / total:.1%} | {e.count / steps:g} |")
    if host_top and cuda:
        host_table(prof, steps, host_top)
    del model, module
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--mode", choices=("infer", "train"), default="train")
    own.add_argument("--steps", type=int, default=5)
    own.add_argument("--top", type=int, default=15)
    own.add_argument("--host-top", type=int, default=0, help="also profile host time: its top N ops")
    mine, rest = own.parse_known_args(argv)
    args = bench_e2e.parse_args(rest)
    import fusepass  # noqa: F401  (registers the backend)

    for name in args.models:
        run = bench_e2e.ModelRun(name, args)
        for variant in ("sdpa_inductor", "fusepass"):
            if variant in args.variants:
                profile(run, variant, mine.mode, mine.steps, mine.top, mine.host_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
