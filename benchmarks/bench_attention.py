"""fusepass kernels beside SDPA flash, SDPA cuDNN, FlexAttention and torch.compile'd plain attention.

bf16, B*N = 16k tokens, hidden 2048 (H = 2048 / D).  TFLOP/s = 4*B*H*N*N*D for the forward
(halved for causal), x3.5 for forward+backward; triton.testing.do_bench median.  Each
provider's output is checked against SDPA flash in the same run.  Appends to a CSV and prints
a markdown table.

    PYTHONPATH=$PWD python benchmarks/bench_attention.py [--csv out.csv] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusepass.autotune.provider import kernel_config_provider as tuned  # what the op hands the launchers
from fusepass.kernels.backward import attention_backward
from fusepass.kernels.forward import attention_forward
from fusepass.ops.dispatch import backward_call, forward_call


def fusepass_fn(q, k, v, causal):
    expr = "j <= i + (N - M)" if causal else ""
    scale = q.shape[-1] ** -0.5

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o, lse = attention_forward(forward_call(q, k, v, [], [], None, scale, 0.0, 0.0, -math.inf, expr, []), config_for=tuned)
            ctx.save_for_backward(q, k, v, o, lse)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            dq, dk, dv, _ = attention_backward(backward_call(do.contiguous(), q, k, v, o, lse, [], [], None, scale, 0.0, 0.0,
                                               -math.inf, expr, [], []), config_for=tuned)
            return dq, dk, dv

    return lambda: Fn.apply(q, k, v)


def sdpa_fn(backend):
    def make(q, k, v, causal):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run
    return make


_flex = None


def flex_compiled():
    """torch.compile(flex_attention), with room for one compiled flex per shape or mask_mod:
    without it dynamo falls back to eager flex (seen: 8-25 TFLOP/s at N=16k) once its
    recompile limit is reached."""
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_cache_size_limit = 4096
        _flex = torch.compile(flex_attention)
    return _flex


def flex_fn(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask

    flex = flex_compiled()
    bm = None
    if causal:
        N = q.shape[2]
        bm = create_block_mask(lambda b, h, i, j: j <= i, None, None, N, N, device=q.device)
    return lambda: flex(q, k, v, block_mask=bm)


def plain(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        N = q.shape[2]
        m = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~m, float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


_plain_c = None


def compiled_plain_fn(q, k, v, causal):
    global _plain_c
    if _plain_c is None:
        _plain_c = torch.compile(plain)
    return lambda: _plain_c(q, k, v, causal)


# The benchmark's shapes: bf16, B*N = 16k tokens, hidden 2048 (benchmarks/bench_autotune.py imports these).
DIMS = (64, 128)
SEQS = (1024, 4096, 16384)
MODES = ("fwd", "fwd+bwd")


def shapes(dims=DIMS, seqs=SEQS):
    """(D, N, B, H, causal) of every case, in the table's order."""
    return [(D, N, max(1, 16384 // N), 2048 // D, causal) for D in dims for N in seqs for causal in (False, True)]


PROVIDERS = {
    "fusepass": fusepass_fn,
    "sdpa_flash": sdpa_fn(SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": sdpa_fn(SDPBackend.CUDNN_ATTENTION),
    "flex": flex_fn,
    "compiled_plain": compiled_plain_fn,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default="benchmarks/results.csv")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--dims", default=",".join(map(str, DIMS)))
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    providers = args.providers.split(",")
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = []
    for D in map(int, args.dims.split(",")):
        H = 2048 // D
        for N in map(int, args.seqs.split(",")):
            B = max(1, 16384 // N)
            for causal in (False, True):
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                do = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                ref_grads = torch.autograd.grad(ref, (q, k, v), do)
                flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                for mode in args.modes.split(","):
                    for name in providers:
                        if name == "compiled_plain" and N > 4096:
                            continue  # materializes B*H*N*N scores
                        try:
                            fn = PROVIDERS[name](q, k, v, causal)
                            out = fn()
                            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                            if mode == "fwd":
                                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                                f = flops
                            else:
                                grads = torch.autograd.grad(out, (q, k, v), do)
                                err = max([err] + [((g.float() - r.float()).norm() / r.float().norm()).item()
                                                   for g, r in zip(grads, ref_grads)])

                                def step():
                                    o = fn()
                                    torch.autograd.grad(o, (q, k, v), do)
                                ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                                f = 3.5 * flops
                            tf = f / ms / 1e9
                        except Exception as e:  # a provider that cannot run this case
                            print(f"# {name} D={D} N={N} causal={causal} {mode}: {type(e).__name__}: {str(e)[:200]}",
                                  file=sys.stderr)
                            ms, tf, err = float("nan"), float("nan"), float("nan")
                        rows.append(dict(date=stamp, gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                                         D=D, N=N, B=B, H=H, causal=causal, mode=mode, provider=name,
                                         ms=round(ms, 4), tflops=round(tf, 1), rel_err=f"{err:.1e}"))
                        print(rows[-1], flush=True)
                del q, k, v, do, ref, ref_grads
                torch.cuda.empty_cache()
    new = not os.path.exists(args.csv)
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    # Markdown: one line per case, TFLOP/s per provider.
    print(f"\n{gpu}, torch {torch.__version__}, triton {triton.__version__}, {stamp} UTC; TFLOP/s (median)\n")
    print("| D | N | causal | mode | " + " | ".join(providers) + " |")
    print("|---" * (4 + len(providers)) + "|")
    cases = {}
    for r in rows:
        cases.setdefault((r["D"], r["N"], r["causal"], r["mode"]), {})[r["provider"]] = r
    for (D, N, c, m), byp in cases.items():
        cells = [f"{byp[p]['tflops']:.0f}" if p in byp and not math.isnan(byp[p]["tflops"]) else "-" for p in providers]
        print(f"| {D} | {N // 1024}k | {'yes' if c else 'no'} | {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
