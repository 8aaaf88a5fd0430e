"""Host time of each stage of a fused call, without a profiler: what a call spends where.

Each stage is timed alone over many back-to-back calls (the kernels are tiny, so the host is
the bottleneck): allocation, the typed call, the run decision, the plan lookup, argument
packing, the launch, the whole kernel path, the op through the dispatcher (with and without
its autograd layer, and a no-op op of the same schema: the dispatcher's own cost), the
compiled site, and SDPA eager and compiled beside them.

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/host_stages.py [--n 3000] [--seq 16]

On a machine without CUDA only the stages that launch nothing are timed (CPU tensors).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import fusepass  # noqa: F401 (registers the backend and the ops)
from fusepass.kernels import decode, forward, launch_common
from fusepass.ops import dispatch
from fusepass.options import RunOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_overhead import per_call_us  # noqa: E402  (the same timer: warm-up, median of rounds)

_noop_lib = torch.library.Library("fusepass_stage", "DEF")
_noop_lib.define(
    "noop(Tensor q, Tensor k, Tensor v, Tensor[] biases, Tensor[] masks, Tensor? seed, float scale, "
    "float softcap, float dropout_p, float mask_fill, str mask_expr, SymInt[] mask_args, str run=\"\") "
    "-> (Tensor, Tensor)")
_OUTS: list = []


def _noop(q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run=""):
    return _OUTS[0], _OUTS[1]


_noop_lib.impl("noop", _noop, "CompositeExplicitAutograd")


def attn(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(s, dim=-1) @ v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="then cProfile of --n dispatch.forward calls (tottime)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    q = torch.randn(1, 1, args.seq, 64, device=dev, dtype=torch.bfloat16)
    _OUTS[:] = [torch.empty_like(q), torch.empty((1, 1, args.seq), device=dev)]
    run = "autotune=0"
    op_args = (q, q, q, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [], run)
    call = dispatch.forward_call(*op_args)
    rows = [
        ("torch.empty (out)", lambda: torch.empty((1, 1, args.seq, 64), device=dev, dtype=torch.bfloat16)),
        ("RunOptions.decode", lambda: RunOptions.decode(run)),
        ("forward_call (build + validate)", lambda: dispatch.forward_call(*op_args)),
        ("call.signature (fresh call)", lambda: dispatch.forward_call(*op_args).signature),
        ("kernel_reason", lambda: dispatch.kernel_reason(call)),
        ("decode.serves", lambda: decode.serves(call)),
        ("extra_args (none)", lambda: launch_common.extra_args(call.biases, call.masks, call.mask_args)),
        ("no-op op via dispatcher", lambda: torch.ops.fusepass_stage.noop.default(*op_args)),
    ]
    if cuda:
        forward.attention_forward(call)
        key = launch_common.plan_key(call, call.signature, None, None)
        p = forward._plans.get(key, lambda: None)
        out, lse = _OUTS
        launch = p.launcher(p.cfg)
        f = torch.compile(attn, backend="fusepass", options={"autotune": False})
        sd = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        rows += [
            ("plan lookup (plan_key + get)",
             lambda: forward._plans.get(launch_common.plan_key(call, call.signature, None, None), lambda: None)),
            ("Launcher, arguments prepared",
             lambda: launch(p.grid, q, q, q, out, lse, None, *p.map_args, tail=p.tail)),
            ("kernels.forward.attention_forward", lambda: forward.attention_forward(call)),
            ("dispatch.forward", lambda: dispatch.forward(*op_args)),
            ("op attention_inference", lambda: torch.ops.fusepass.attention_inference.default(*op_args)),
            ("op attention (autograd layer)", lambda: torch.ops.fusepass.attention.default(*op_args)),
            ("compiled site", lambda: f(q, q, q)),
            ("SDPA eager", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)),
            ("SDPA compiled", lambda: sd(q, q, q)),
        ]
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; B=1 H=1 N={args.seq} D=64 bf16; "
          f"µs per call, median of 5 x {args.n}")
    print("| stage | µs |\n|---|---|")
    with torch.no_grad():
        for name, fn in rows:
            print(f"| {name} | {per_call_us(fn, args.n, repeats=5):.1f} |", flush=True)
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.n):
                dispatch.forward(*op_args)
            prof.disable()
            sync()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
