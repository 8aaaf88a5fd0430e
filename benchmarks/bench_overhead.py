"""Host cost of one attention call at tiny shapes, where the GPU work is a few microseconds.

B=1, H=1, N=16..128, D=64, bf16.  Per-call time of back-to-back calls (wall clock over many
calls, synchronized once at the end; median of repeats), for:

- fusepass under torch.compile (plain attention code, ``backend="fusepass"``, autotune off:
  the tuner's lookup is part of the plan, made once);
- the fused op called directly (``torch.ops.fusepass.attention``: dispatcher + the launch path);
- the same Triton kernel launched bare (its launch plan's arguments prepared once);
- the same bare launch wrapped in ``torch.library.triton_op`` under torch.compile (what
  Inductor emitting the launch itself would cost);
- SDPA eager, SDPA under torch.compile, compiled FlexAttention;
- ``mode="reduce-overhead"`` (CUDA graphs) for fusepass and for SDPA.

Every variant's output is checked against SDPA once.  Prints a markdown table.

    PYTHONPATH=$PWD python benchmarks/bench_overhead.py [--seqs 16,32,64,128] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call_us(fn, calls: int, repeats: int = 7) -> float:
    for _ in range(20):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def bare_launch(q, k, v):
    """The fused forward's kernel with every argument prepared once: only Triton's launcher runs."""
    from fusepass.kernels import forward
    from fusepass.kernels.launch_common import extra_args
    from fusepass.ops.dispatch import forward_call

    call = forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [], "autotune=0")
    plan = forward._make_plan(call, None, None)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse, None, *plan.map_args, *extra_args((), (), ()), *plan.tail)
    kernel, grid, consts, cfg = plan.kernel, plan.grid, plan.consts, plan.cfg

    def run():
        kernel[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out

    return run


def direct_launch(q, k, v):
    """The same kernel and arguments through fusepass's Launcher (kernels/launcher.py): Triton's
    compiled launcher without JITFunction.run's per-call binding."""
    from fusepass.kernels import forward
    from fusepass.kernels.launch_common import extra_args
    from fusepass.kernels.launcher import Launcher
    from fusepass.ops.dispatch import forward_call

    call = forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [], "autotune=0")
    plan = forward._make_plan(call, None, None)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse, None, *plan.map_args, *extra_args((), (), ()))
    launch = Launcher(plan.kernel, plan.consts, plan.cfg.num_warps, plan.cfg.num_stages)

    def run():
        launch(plan.grid, *args, tail=plan.tail)  # as kernels/forward.py launches
        return out

    return run


def triton_op_launch(q, k, v):
    """The bare launch as a ``torch.library.triton_op`` (Inductor then emits the launch into
    its generated code), compiled."""
    from torch.library import triton_op, wrap_triton

    from fusepass.kernels import forward
    from fusepass.ops.dispatch import forward_call

    call = forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [], "autotune=0")
    plan = forward._make_plan(call, None, None)
    kernel, grid, consts, cfg, tail = plan.kernel, plan.grid, plan.consts, plan.cfg, plan.tail

    @triton_op("fusepass_bench::plain_attention", mutates_args=())
    def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        wrap_triton(kernel)[grid](q, k, v, out, lse, None, *plan.map_args, *tail, **consts,
                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out

    compiled = torch.compile(lambda q, k, v: plain_attention(q, k, v), fullgraph=True)
    return lambda: compiled(q, k, v)


def variants(q, k, v):
    import fusepass  # noqa: F401  (registers the backend and the op)
    from torch.nn.attention.flex_attention import flex_attention

    fused = torch.compile(attention, backend="fusepass", options={"autotune": False})
    op = torch.ops.fusepass.attention
    op_inference = torch.ops.fusepass.attention_inference
    flex = torch.compile(flex_attention)
    sdpa_c = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.125))
    fused_graphs = torch.compile(attention, backend="fusepass", mode="reduce-overhead")
    sdpa_graphs = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.125),
                                mode="reduce-overhead")
    out = {
        "fusepass, torch.compile": lambda: fused(q, k, v),
        "fusepass op, called directly": lambda: op(q, k, v, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [],
                                                   "autotune=0")[0],
        "fusepass op without autograd (what a no-grad site calls)": lambda: op_inference(
            q, k, v, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [], "autotune=0")[0],
        "bare Triton launch (same kernel)": bare_launch(q, k, v),
        "fusepass Launcher, arguments prepared once": direct_launch(q, k, v),
        "triton_op + wrap_triton, torch.compile": None,
        "SDPA eager": lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125),
        "SDPA, torch.compile": lambda: sdpa_c(q, k, v),
        "Flex, torch.compile": lambda: flex(q, k, v, scale=0.125),
        "fusepass, reduce-overhead": lambda: fused_graphs(q, k, v),
        "SDPA, reduce-overhead": lambda: sdpa_graphs(q, k, v),
    }
    try:
        out["triton_op + wrap_triton, torch.compile"] = triton_op_launch(q, k, v)
    except Exception as e:  # an API this torch lacks: say so in the table
        out["triton_op + wrap_triton, torch.compile"] = f"{type(e).__name__}: {str(e)[:80]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="16,32,64,128")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test (FUSEPASS_INTERPRET=1), no real timings")
    args = ap.parse_args()
    from torch._dynamo.utils import counters

    torch._dynamo.config.cache_size_limit = 64
    seqs = [int(s) for s in args.seqs.split(",")]
    rows: dict[str, list[str]] = {}
    for N in seqs:
        torch.manual_seed(N)
        q, k, v = (torch.randn(1, 1, N, 64, device=args.device, dtype=torch.bfloat16) for _ in range(3))
        want = F.scaled_dot_product_attention(q, k, v, scale=0.125).float()
        torch._dynamo.reset()  # each N compiles afresh (static shapes), as a new model would
        counters.clear()
        for name, fn in variants(q, k, v).items():
            if isinstance(fn, str):
                rows.setdefault(name, []).append(f"n/a ({fn})")
                continue
            try:
                got = fn()
                got = got[0] if isinstance(got, tuple) else got
                err = (got.float() - want).abs().max().item()
                if not err <= 2e-2:
                    raise AssertionError(f"max error {err:.3g} against SDPA")
                rows.setdefault(name, []).append(f"{per_call_us(fn, args.calls):.1f}")
            except Exception as e:
                rows.setdefault(name, []).append(f"failed ({type(e).__name__}: {str(e)[:60]})")
        fused = counters["fusepass"]["attention_fused"]
        print(f"N={N}: fusepass sites fused {fused}", flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test)"
    print(f"\n{gpu}, torch {torch.__version__}, bf16, B=1 H=1 D=64; "
          f"us per call (back-to-back, median of 7 x {args.calls})\n")
    print("| variant | " + " | ".join(f"N={n}" for n in seqs) + " |")
    print("|---|" + "---|" * len(seqs))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
