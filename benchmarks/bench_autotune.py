"""Autotuning: seconds spent tuning per key, tuned config vs the heuristic default, and the
first-compile time of a transformers Llama with a cold / warm tuning cache beside Inductor.

    PYTHONPATH=$PWD python benchmarks/bench_autotune.py kernels --json out.json [--deadline S]
    PYTHONPATH=$PWD python benchmarks/bench_autotune.py model --json out.json

``kernels``: the shapes of benchmarks/bench_attention.py (bf16, B*N = 16k tokens, hidden 2048,
D in {64, 128}, N in {1k, 4k, 16k}, causal and not).  Each case tunes its forward and its
backward key through the launchers' hook (``provider.kernel_config_provider``, the call's own
arguments in the query) on a fresh cache ($FUSEPASS_CACHE_DIR), then times forward and
forward+backward with the tuned configs and with ``heuristics.default_for`` (do_bench median,
25/100 ms), alternating the two.  Cases left when ``--deadline`` seconds have passed are skipped.

``model``: three fresh processes, each with empty Inductor and Triton caches: Inductor alone,
fusepass with an empty tuning cache, fusepass with the cache the previous one filled.  Each
times torch.compile + the first forward (eval, no_grad) of LlamaModel (4 layers, hidden 1024,
16 heads of 64, 4 KV heads, eager attention), B=4, S=2048, bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _ms(fn):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def kernels(args) -> list[dict]:
    from bench_attention import shapes

    from fusepass.autotune import provider
    from fusepass.autotune.tuner import default_tuner
    from fusepass.kernels import heuristics
    from fusepass.kernels.backward import attention_backward
    from fusepass.kernels.forward import attention_forward
    from fusepass.kernels.heuristics import ConfigQuery
    from fusepass.kernels.spec import KernelSpec
    from fusepass.ops.dispatch import backward_call, forward_call

    provider.install()
    tuner = default_tuner()
    print(f"# cache: {tuner.cache.path if hasattr(tuner.cache, 'path') else tuner.cache}", flush=True)
    start = time.monotonic()
    rows = []
    from bench_attention import DIMS, SEQS

    dims = tuple(map(int, args.dims.split(","))) if args.dims else DIMS
    seqs = tuple(map(int, args.seqs.split(","))) if args.seqs else SEQS
    for D, N, B, H, causal in shapes(dims, seqs):
        if time.monotonic() - start > args.deadline:
            print(f"# deadline: skipped D={D} N={N} causal={causal}", flush=True)
            continue
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        expr = "j <= i + (N - M)" if causal else ""
        call = ([], [], None, D ** -0.5, 0.0, 0.0, -math.inf, expr, [])
        fcall = forward_call(q, k, v, *call)
        spec_f = KernelSpec.for_call(fcall)
        spec_b = KernelSpec.for_call(fcall, bias_needs_grad=[])
        qf = ConfigQuery("fwd", spec_f, q.dtype, B, H, H, N, N, q.device, call=fcall)
        qb = ConfigQuery("bwd", spec_b, q.dtype, B, H, H, N, N, q.device, call=fcall)
        row = dict(D=D, N=N, B=B, H=H, causal=causal)
        cfgs = {}
        for name, query in (("fwd", qf), ("bwd", qb)):
            before = tuner.tuned_count
            t0 = time.perf_counter()
            cfg = provider.kernel_config_provider(query)
            wall = time.perf_counter() - t0
            entry = tuner.lookup(provider.query_key(query))
            assert cfg is not None and entry is not None and tuner.tuned_count == before + 1, name
            default = heuristics.default_for(query)
            cfgs[name] = (cfg, default)
            row[f"{name}_tune_s"] = round(wall, 2)
            row[f"{name}_candidates"] = entry.candidates
            row[f"{name}_tuned"] = cfg.short()
            row[f"{name}_default"] = default.short()
            row[f"{name}_tune_speedup"] = round(entry.default_ms / entry.time_ms, 3) if entry.default_ms else None
        (cf, df), (cb, db) = cfgs["fwd"], cfgs["bwd"]

        def fwd(c):
            return lambda: attention_forward(fcall, config=c)

        def fwd_bwd(c_f, c_b):
            def step():
                o, lse = attention_forward(fcall, config=c_f)
                attention_backward(backward_call(do, q, k, v, o, lse, *call, []), config=c_b)
            return step

        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        # Correctness of the tuned configs against the defaults (same math, other tiling).
        o_t, _ = attention_forward(fcall, config=cf)
        o_d, _ = attention_forward(fcall, config=df)
        row["fwd_rel_diff"] = float(((o_t.float() - o_d.float()).norm() / o_d.float().norm()).item())
        for mode, tuned_fn, default_fn, f in (("fwd", fwd(cf), fwd(df), flops),
                                              ("fwd+bwd", fwd_bwd(cf, cb), fwd_bwd(df, db), 3.5 * flops)):
            t_d1, t_t1 = _ms(default_fn), _ms(tuned_fn)
            t_d2, t_t2 = _ms(default_fn), _ms(tuned_fn)
            t_d, t_t = min(t_d1, t_d2), min(t_t1, t_t2)
            row[f"{mode}_default_ms"], row[f"{mode}_tuned_ms"] = round(t_d, 4), round(t_t, 4)
            row[f"{mode}_default_tflops"] = round(f / t_d / 1e9, 1)
            row[f"{mode}_tuned_tflops"] = round(f / t_t / 1e9, 1)
            row[f"{mode}_speedup"] = round(t_d / t_t, 3)
            row[f"{mode}_spread"] = round(max(abs(t_d1 - t_d2) / t_d, abs(t_t1 - t_t2) / t_t), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, do, o_t, o_d
        torch.cuda.empty_cache()
    print("\n| D | N | causal | fwd tune s | bwd tune s | fwd tuned / default | fwd TFLOP/s tuned / default | "
          "fwd speedup | bwd tuned / default | fwd+bwd TFLOP/s tuned / default | fwd+bwd speedup |")
    print("|---" * 11 + "|")
    for r in rows:
        print(f"| {r['D']} | {r['N'] // 1024}k | {'yes' if r['causal'] else 'no'} | {r['fwd_tune_s']:.1f} | "
              f"{r['bwd_tune_s']:.1f} | {r['fwd_tuned']} / {r['fwd_default']} | "
              f"{r['fwd_tuned_tflops']:.0f} / {r['fwd_default_tflops']:.0f} | {r['fwd_speedup']:.2f}x | "
              f"{r['bwd_tuned']} / {r['bwd_default']} | {r['fwd+bwd_tuned_tflops']:.0f} / "
              f"{r['fwd+bwd_default_tflops']:.0f} | {r['fwd+bwd_speedup']:.2f}x |")
    return rows


MODEL_CHILD = r"""
import json, os, sys, time, torch, transformers
backend = sys.argv[1]
cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                               max_position_embeddings=4096, attn_implementation="eager")
torch.manual_seed(0)
model = transformers.LlamaModel(cfg).to("cuda", torch.bfloat16).eval()
ids = torch.randint(0, 32000, (4, 2048), device="cuda")
with torch.no_grad():
    ref = model(input_ids=ids).last_hidden_state
    torch.cuda.synchronize()
    if backend == "fusepass":
        import fusepass  # noqa: F401
        from fusepass.autotune.tuner import default_tuner
    t0 = time.perf_counter()
    compiled = torch.compile(model, backend=backend)
    out = compiled(input_ids=ids).last_hidden_state
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(10):
        t = time.perf_counter(); compiled(input_ids=ids); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
from torch._dynamo.utils import counters
err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
res = dict(backend=backend, first_s=round(first, 2), step_ms=round(sorted(times)[5] * 1e3, 2), rel_err=err,
           fused=int(counters["fusepass"]["attention_fused"]))
if backend == "fusepass":
    t = default_tuner()
    res["tuned_keys"] = t.tuned_count
    res["tuning_s"] = round(sum(e.tuning_seconds for e in t.cache.entries().values()), 2) if t.tuned_count else 0.0
print(json.dumps(res))
"""


def model(args) -> list[dict]:
    cache = tempfile.mkdtemp(prefix="fusepass-tune-")
    rows = []
    for label, backend in (("inductor", "inductor"), ("fusepass, cold cache", "fusepass"),
                           ("fusepass, warm cache", "fusepass")):
        env = {**os.environ, "FUSEPASS_CACHE_DIR": cache,
               "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-"),
               "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-")}
        env.pop("FUSEPASS_AUTOTUNE", None)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", MODEL_CHILD, backend], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        sys.stderr.write("".join(line + "\n" for line in r.stderr.splitlines() if "[fusepass]" in line))
        if r.returncode != 0:
            print(f"# {label} failed:\n{r.stderr[-3000:]}", flush=True)
            continue
        row = dict(json.loads(r.stdout.strip().splitlines()[-1]), label=label, process_s=round(wall, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| run | torch.compile + first forward (s) | tuned keys | tuning (s) | steady forward (ms) | fused |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['first_s']:.1f} | {r.get('tuned_keys', '-')} | {r.get('tuning_s', '-')} | "
              f"{r['step_ms']:.1f} | {r['fused']} |")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kernels", "model"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dims", default="", help="head dims, e.g. 128 (default: bench_attention's)")
    ap.add_argument("--seqs", default="", help="sequence lengths, e.g. 16384 (default: bench_attention's)")
    ap.add_argument("--deadline", type=float, default=math.inf, help="seconds; later cases are skipped")
    args = ap.parse_args()
    import triton

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print(f"# {meta}", flush=True)
    rows = kernels(args) if args.what == "kernels" else model(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
