"""The sm_90 forward (TMA descriptors, warp specialization) beside fusepass's FA2 forward, SDPA
cuDNN, SDPA flash and compiled FlexAttention, on one Hopper GPU.

Forward only, B=4 H=16 (B*H*N >= 64k rows), N in {1024, 4096, 8192, 16384}, D in {64, 128},
causal and not.  TFLOP/s = 4*B*H*N*N*D (halved for causal) over triton.testing.do_bench's
median.  The sm90 column is the best of ``sm90.configs_for`` (the winner's config beside it,
as it really launched: ``sm90.fitted_config``); its error column is the largest max-abs error
of any of its configs against SDPA (flash) in the same run.  Prints a Markdown table; with
--csv, also appends the rows there.

With --backward, forward+backward instead, on the same shapes: TFLOP/s counts 3.5x the
forward's FLOPs (the backward does 2.5x the forward's work, as benchmarks/bench_attention.py
counts).  The sm90 column is the sm_90 forward (its default config, what the dispatch runs)
and the sm_90 backward at the best of ``sm90.backward_configs_for``; fa2 is fusepass's FA2
forward and backward at their default configs; SDPA and Flex run through autograd.  Its error
column is the largest max-abs error of dq, dk, dv (any sm90 backward config) against SDPA
flash's gradients in the same run.  NOTE: its run time is not measured yet; compiles dominate
(4 backward configs x 2 kernels per head dim and mask, and Flex's forward+backward), so one
--dims per invocation is the way to stay near 4 minutes.

    PYTHONPATH=$PWD python benchmarks/bench_sm90.py [--dtype bf16] [--seqs 1024,4096] [--csv out.csv]
    PYTHONPATH=$PWD python benchmarks/bench_sm90.py --backward [--bwd-configs default] [--no-flex]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from fusepass.kernels import backward, forward, sm90
from fusepass.ops.dispatch import backward_call, forward_call

CAUSAL = "j <= i + (N - M)"
DIMS = (64, 128)
SEQS = (1024, 4096, 8192, 16384)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bench(fn) -> float:
    """Median ms.  NOTE: warmup/rep below the project's 25/100 keep the whole run under 5 min on
    the H200 (the sm90 column times ~9 configs per row)."""
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def make_call(q, k, v, causal):
    return forward_call(q, k, v, [], [], None, q.shape[-1] ** -0.5, 0.0, 0.0, -math.inf, CAUSAL if causal else "", [])


def sdpa(backend, q, k, v, causal):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


_flex = None


def flex(q, k, v, causal):
    """torch.compile(flex_attention) with room for a compiled variant per shape (bench_attention.py's reason)."""
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 256
        _flex = torch.compile(flex_attention)
    bm = None
    if causal:
        N = q.shape[2]
        bm = create_block_mask(lambda b, h, i, j: j <= i, None, None, N, N, device=q.device)
    return lambda: _flex(q, k, v, block_mask=bm)


def max_err(out, ref) -> float:
    return (out.float() - ref.float()).abs().max().item()


def time_sm90(call, ref):
    """(best ms, the config that won as it launched, worst error over all configs)."""
    best, winner, worst = math.inf, None, 0.0
    for cfg in sm90.configs_for(call):
        try:
            fn = lambda cfg=cfg: sm90.attention_forward(call, cfg)  # noqa: E731
            worst = max(worst, max_err(fn()[0], ref))
            ms = bench(fn)
        except Exception as e:  # a config this Triton cannot build: reported, not fatal
            print(f"# sm90 {cfg.short()}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
            continue
        if ms < best:
            best, winner = ms, sm90.fitted_config(call, cfg)
    return best, winner, worst


def time_provider(make) -> tuple[float, float]:
    """(ms, output) of one provider; NaN where it cannot run the case."""
    try:
        fn = make()
        out = fn()
        return bench(fn), out
    except Exception as e:
        print(f"# {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        return math.nan, None


def run_case(D, N, B, H, causal, dtype, dev):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    call = make_call(q, k, v, causal)
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    tf = lambda ms: flops / ms / 1e9  # noqa: E731
    row = dict(D=D, N=N, B=B, H=H, causal=causal)
    reason = sm90.refusal(call)
    if reason is None:
        ms, winner, err = time_sm90(call, ref)
        row.update(sm90=tf(ms), sm90_config=winner.short() if winner else "none built", sm90_err=err)
    else:
        row.update(sm90=math.nan, sm90_config=f"refused: {reason}", sm90_err=math.nan)
    providers = {
        "fa2": lambda: (lambda: forward.attention_forward(call)),
        "sdpa_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal),
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal),
        "flex": lambda: flex(q, k, v, causal),
    }
    for name, make in providers.items():
        ms, _ = time_provider(make)
        row[name] = tf(ms)
    return row


COLUMNS = ("sm90", "fa2", "sdpa_cudnn", "sdpa_flash", "flex")


# Forward + backward (--backward).

def fusepass_fwd_bwd(fwd, bwd, q, k, v, do, causal):
    """One forward and one backward through fusepass's kernels (``fwd(call)``, ``bwd(bcall)``)."""
    expr = CAUSAL if causal else ""
    scale = q.shape[-1] ** -0.5
    call = make_call(q, k, v, causal)

    def run():
        out, lse = fwd(call)
        dq, dk, dv, _ = bwd(backward_call(do, q, k, v, out, lse, [], [], None, scale, 0.0, 0.0, -math.inf, expr,
                                          [], []))
        return dq, dk, dv
    return run


def autograd_fwd_bwd(make, q, k, v, do):
    """The forward ``make(q, k, v)`` returns (a function of no arguments, on leaves that
    require grad), and its gradients through autograd."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    fwd = make(*leaves)

    def run():
        return torch.autograd.grad(fwd(), leaves, do)
    return run


def grads_err(got, ref) -> float:
    return max(max_err(a, b) for a, b in zip(got, ref))


def time_sm90_backward(q, k, v, do, causal, ref, which):
    """(best ms, the backward config that won, worst gradient error over all configs)."""
    probe = make_call(q, k, v, causal)
    out, lse = sm90.attention_forward(probe)
    bcall = backward_call(do, q, k, v, out, lse, [], [], None, q.shape[-1] ** -0.5, 0.0, 0.0, -math.inf,
                          probe.mask_expr, [], [])
    cfgs = sm90.backward_configs_for(bcall) if which == "all" else [sm90.backward_default_config(bcall)]
    best, winner, worst = math.inf, None, 0.0
    for cfg in cfgs:
        try:
            fn = fusepass_fwd_bwd(sm90.attention_forward, lambda b, cfg=cfg: sm90.attention_backward(b, cfg),
                                  q, k, v, do, causal)
            worst = max(worst, grads_err(fn(), ref))
            ms = bench(fn)
        except Exception as e:  # a config this Triton cannot build: reported, not fatal
            print(f"# sm90 bwd {cfg.short()}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
            continue
        if ms < best:
            fitted = sm90.fitted_backward_config(bcall, cfg)
            best, winner = ms, fitted.get("attn_bwd_dkdv", cfg)
    return best, winner, worst


def run_backward_case(D, N, B, H, causal, dtype, dev, which, with_flex):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(4))
    ref = autograd_fwd_bwd(lambda *t: sdpa(SDPBackend.FLASH_ATTENTION, *t, causal), q, k, v, do)()
    flops = 3.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    tf = lambda ms: flops / ms / 1e9  # noqa: E731
    row = dict(D=D, N=N, B=B, H=H, causal=causal)
    out, lse = forward.attention_forward(make_call(q, k, v, causal))
    bcall = backward_call(do, q, k, v, out, lse, [], [], None, D ** -0.5, 0.0, 0.0, -math.inf,
                          CAUSAL if causal else "", [], [])
    reason = sm90.backward_refusal(bcall)
    if reason is None:
        ms, winner, err = time_sm90_backward(q, k, v, do, causal, ref, which)
        row.update(sm90=tf(ms), sm90_config=winner.short() if winner else "none built", sm90_err=err)
    else:
        row.update(sm90=math.nan, sm90_config=f"refused: {reason}", sm90_err=math.nan)
    providers = {
        "fa2": lambda: fusepass_fwd_bwd(forward.attention_forward, backward.attention_backward, q, k, v, do, causal),
        "sdpa_cudnn": lambda: autograd_fwd_bwd(lambda *t: sdpa(SDPBackend.CUDNN_ATTENTION, *t, causal), q, k, v, do),
        "sdpa_flash": lambda: autograd_fwd_bwd(lambda *t: sdpa(SDPBackend.FLASH_ATTENTION, *t, causal), q, k, v, do),
    }
    if with_flex:
        providers["flex"] = lambda: autograd_fwd_bwd(lambda *t: flex(*t, causal), q, k, v, do)
    for name in COLUMNS[1:]:
        row[name] = tf(time_provider(providers[name])[0]) if name in providers else math.nan
    row["vs_cudnn"] = row["sm90"] / row["sdpa_cudnn"] if row["sdpa_cudnn"] > 0 else math.nan
    return row


def print_table(rows, header, backward_table=False):
    print(f"\n{header}\n")
    ratio = " sm90 / cudnn |" if backward_table else ""
    print("| D | N | causal | " + " | ".join(COLUMNS) + f" |{ratio} sm90 config | sm90 max abs err vs SDPA |")
    print("|---" * (3 + len(COLUMNS) + 2 + bool(backward_table)) + "|")
    for r in rows:
        cells = [f"{r[c]:.0f}" if not math.isnan(r[c]) else "n/a" for c in COLUMNS]
        extra = f" {r['vs_cudnn']:.2f} |" if backward_table else ""
        print(f"| {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | " + " | ".join(cells)
              + f" |{extra} {r['sm90_config']} | {r['sm90_err']:.2e} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--dims", default=",".join(map(str, DIMS)))
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--csv", default="", help="append the rows to this CSV file too")
    ap.add_argument("--backward", action="store_true", help="forward+backward instead of the forward")
    ap.add_argument("--bwd-configs", default="all", choices=("all", "default"),
                    help="--backward: time every sm90.backward_configs_for candidate, or the default only")
    ap.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (its compiles are slow)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    start = time.time()
    rows = []
    for D in map(int, args.dims.split(",")):
        for N in map(int, args.seqs.split(",")):
            for causal in (False, True):
                if args.backward:
                    rows.append(run_backward_case(D, N, args.batch, args.heads, causal, DTYPES[args.dtype], dev,
                                                  args.bwd_configs, not args.no_flex))
                else:
                    rows.append(run_case(D, N, args.batch, args.heads, causal, DTYPES[args.dtype], dev))
                shown = {k: round(v, 1) if isinstance(v, float) and k != "sm90_err" else v for k, v in rows[-1].items()}
                print(shown, flush=True)
                torch.cuda.empty_cache()
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["date", "gpu", "torch", "triton", "dtype", *rows[0]])
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(dict(date=stamp, gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                                dtype=args.dtype, **r))
    what = "forward+backward TFLOP/s (3.5x forward FLOPs; median)" if args.backward else "forward TFLOP/s (median)"
    print_table(rows, f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
                      f"B={args.batch} H={args.heads}, {stamp} UTC; {what}; "
                      f"`{' '.join(['python', *sys.argv])}` ({time.time() - start:.0f} s)",
                backward_table=args.backward)


if __name__ == "__main__":
    main()
