"""Masks written as code: fusepass beside SDPA (dense mask / is_causal) and FlexAttention.

bf16, B=1, H=16, D=128.  Cases: sliding window (causal + window) 1024 at N=16k and 4096 at
N=32k, causal, prefix-LM, and packed documents (8 segment ids, causal within a document).

fusepass is driven two ways:
  * ``fp_compile``: ``torch.compile(fn, backend="fusepass")`` of a function that BUILDS the
    mask in code (arange comparisons, segment ids) and applies it nanoGPT-style to
    ``q @ k^T``: the whole path (reader -> predicate / data mask -> kernel) is timed,
    including whatever mask the compiled graph still builds (the segment-id compare);
  * ``fp_op``: ``torch.ops.fusepass.attention`` directly (predicate text, or the dense bool
    mask for documents, whose tile map is then computed on the GPU at every call).
For causal, ``fp_op`` is fusepass's own causal (the op given the causal predicate, what the
reader makes of any causal spelling) and ``sdpa_causal`` is SDPA flash with ``is_causal``
(fusepass leaves SDPA calls to Inductor).  Every output (and dQ/dK/dV) is compared with
SDPA on the dense mask in the same run.  Milliseconds: triton.testing.do_bench median.

    PYTHONPATH=$PWD python benchmarks/bench_masks.py [--quick] [--modes fwd,fwd+bwd]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import fusepass  # noqa: F401  (registers the backend)
from fusepass.ops.attention import fused_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import flex_compiled  # noqa: E402  (one harness for every benchmark)

WINDOW_CASES = {"window1k_16k": (16384, 1024), "window4k_32k": (32768, 4096)}


# ---------------------------------------------------------------- masks as models write them

def _ij(q, k):
    i = torch.arange(q.size(-2), device=q.device)[:, None]
    j = torch.arange(k.size(-2), device=q.device)[None, :]
    return i, j


def attend(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    s = s.masked_fill(~keep, float("-inf"))
    return F.softmax(s, dim=-1) @ v


def make_code_fn(case, W, prefix):
    if case.startswith("window"):
        def fn(q, k, v):
            i, j = _ij(q, k)
            return attend(q, k, v, (j <= i) & (i - j < W))
    elif case == "causal":
        def fn(q, k, v):
            i, j = _ij(q, k)
            return attend(q, k, v, j <= i)
    elif case == "prefix_lm":
        def fn(q, k, v):
            i, j = _ij(q, k)
            return attend(q, k, v, (j <= i) | (j < prefix))
    elif case == "documents":
        def fn(q, k, v, seg):
            i, j = _ij(q, k)
            return attend(q, k, v, (seg[:, None, :, None] == seg[:, None, None, :]) & (j <= i))
    else:
        raise ValueError(case)
    return fn


def predicate_of(case, W, prefix):
    """The op's predicate text and args (what the reader produces), for the direct op call."""
    if case.startswith("window"):
        return "(j <= i) & (i - j < a0)", [W]
    if case in ("causal", "documents"):
        return "j <= i", []
    if case == "prefix_lm":
        return "(j <= i) | (j < a0)", [prefix]
    raise ValueError(case)


def dense_keep(case, N, W, prefix, seg, device):
    i = torch.arange(N, device=device)[:, None]
    j = torch.arange(N, device=device)[None, :]
    if case.startswith("window"):
        keep = (j <= i) & (i - j < W)
    elif case == "causal":
        keep = j <= i
    elif case == "prefix_lm":
        keep = (j <= i) | (j < prefix)
    else:
        keep = (seg[:, None, :, None] == seg[:, None, None, :]) & (j <= i)
    return keep.expand(1, 1, N, N) if keep.dim() == 2 else keep


def mask_mod_of(case, W, prefix, seg):
    if case.startswith("window"):
        return lambda b, h, i, j: (j <= i) & (i - j < W)
    if case == "causal":
        return lambda b, h, i, j: j <= i
    if case == "prefix_lm":
        return lambda b, h, i, j: (j <= i) | (j < prefix)
    return lambda b, h, i, j: (seg[b, i] == seg[b, j]) & (j <= i)


# ---------------------------------------------------------------- runner

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU interpreter smoke test)")
    ap.add_argument("--cases", default="window1k_16k,window4k_32k,causal,documents,prefix_lm")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--providers", default="fp_compile,fp_op,sdpa_causal,flex,sdpa_dense")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_masks.json"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        os.environ["FUSEPASS_INTERPRET"] = "1"
    dtype = torch.bfloat16 if cuda else torch.float32
    H, D = (16, 128) if cuda else (2, 16)
    if cuda:
        import triton
        bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
    else:
        def bench(f):
            t = time.perf_counter()
            f()
            return (time.perf_counter() - t) * 1e3
    providers = args.providers.split(",")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    gpu = torch.cuda.get_device_name(dev) if cuda else "cpu (interpreter)"
    rows = []
    for case in args.cases.split(","):
        if case in WINDOW_CASES:
            N, W = WINDOW_CASES[case]
        else:
            N, W = 16384, 0
        if not cuda:
            N, W = 256, max(1, W // 64)
        prefix = N // 4
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype) for _ in range(3))
        do = torch.randn(1, H, N, D, device=dev, dtype=dtype)
        seg = None
        extra = ()
        if case == "documents":
            # 8 documents of random lengths (at least N/32 each), as packed sequences have.
            cuts = torch.sort(torch.randperm(N // (N // 32) - 1)[:7] + 1).values * (N // 32)
            seg = torch.bucketize(torch.arange(N), cuts, right=True).to(dev)[None, :]
            extra = (seg,)
        keep = dense_keep(case, N, W, prefix, seg, dev)
        density = keep.float().mean().item()
        expr, eargs = predicate_of(case, W, prefix)
        code_fn = make_code_fn(case, W, prefix)

        def make(name):
            if name == "sdpa_dense":
                return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            if name == "sdpa_causal":
                if case != "causal" or not cuda:
                    return None
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def f(q, k, v):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return f
            if name == "fp_compile":
                c = torch.compile(code_fn, backend="fusepass")
                return lambda q, k, v: c(q, k, v, *extra)
            if name == "fp_op":
                if case == "documents":
                    data = (seg[:, None, :, None] == seg[:, None, None, :])
                    return lambda q, k, v: fused_attention(q, k, v, masks=[data], mask_expr=expr, mask_args=eargs)
                return lambda q, k, v: fused_attention(q, k, v, mask_expr=expr, mask_args=eargs)
            if name == "flex":
                if not cuda:
                    return None
                from torch.nn.attention.flex_attention import create_block_mask

                bm = create_block_mask(mask_mod_of(case, W, prefix, seg), None, None, N, N, device=dev)
                fl = flex_compiled()
                return lambda q, k, v: fl(q, k, v, block_mask=bm)
            raise ValueError(name)

        # Reference: SDPA on the dense mask (efficient-attention kernel, fp32 accumulation).
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(ql, kl, vl, attn_mask=keep)
        ref_g = torch.autograd.grad(ref, (ql, kl, vl), do)
        ref = ref.detach()
        for mode in args.modes.split(","):
            for name in providers:
                try:
                    fn = make(name)
                    if fn is None:
                        continue
                    ql, kl, vl = (t.clone().requires_grad_(mode != "fwd") for t in (q, k, v))
                    t0 = time.perf_counter()
                    out = fn(ql, kl, vl)
                    first_s = time.perf_counter() - t0
                    err = rel(out, ref)
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = bench(lambda: fn(q, k, v))
                    else:
                        g = torch.autograd.grad(out, (ql, kl, vl), do)
                        err = max([err] + [rel(a, b) for a, b in zip(g, ref_g)])

                        def step():
                            o = fn(ql, kl, vl)
                            torch.autograd.grad(o, (ql, kl, vl), do)
                        ms = bench(step)
                except Exception as e:  # a provider that cannot run this case
                    print(f"# {case} {mode} {name}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
                    ms, err, first_s = float("nan"), float("nan"), float("nan")
                rows.append(dict(case=case, N=N, W=W, density=round(density, 4), mode=mode, provider=name,
                                 ms=round(ms, 4), rel_err=float(f"{err:.2e}"), first_call_s=round(first_s, 2)))
                print(json.dumps(rows[-1]), flush=True)
        del q, k, v, do, keep, ref, ref_g
        if cuda:
            torch.cuda.empty_cache()
    meta = dict(date=stamp, gpu=gpu, torch=torch.__version__)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{gpu}, torch {meta['torch']}, triton {meta.get('triton')}, {stamp} UTC; ms (median), "
          f"max rel err vs SDPA dense mask\n")
    print("| case | N | mode | " + " | ".join(providers) + " |")
    print("|---" * (3 + len(providers)) + "|")
    cases = {}
    for r in rows:
        cases.setdefault((r["case"], r["N"], r["mode"]), {})[r["provider"]] = r
    for (c, N, m), byp in cases.items():
        cells = []
        for p in providers:
            r = byp.get(p)
            cells.append("-" if r is None or math.isnan(r["ms"]) else f"{r['ms']:.3f} ({r['rel_err']:.0e})")
        print(f"| {c} | {N // 1024}k | {m} | " + " | ".join(cells) + " |")
    bad = [r for r in rows if not math.isnan(r["rel_err"]) and r["rel_err"] > 2e-2]
    print("\ncorrectness:", "all outputs within 2e-2 of SDPA (dense mask)" if not bad else f"FAILED {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
