"""Time the decode family's kernels over a grid of DecodeConfig values (to choose the
heuristic default in kernels/decode.py): bf16, one query per sequence, Hq=32, D=128.

Kernel time only (triton.testing.do_bench: CUDA events around the two launches), K+V bytes
read per µs as TB/s; the default config's row is marked.

    PYTHONPATH=$PWD python benchmarks/sweep_decode.py [--shapes 8x16384x8,1x131072x8]
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton

from fusepass.autotune.config import DecodeConfig
from fusepass.kernels import decode
from fusepass.ops.dispatch import forward_call

SHAPES = "8x4096x8,32x4096x8,8x16384x8,8x16384x4,8x32768x8,1x131072x8,8x16384x32"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES, help="BxNxHkv, comma-separated")
    ap.add_argument("--block-n", default="64,128,256")
    ap.add_argument("--splits-per-sm", default="1,2,4,8", help="programs per SM the split count aims at")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--warps", default="4,8")
    args = ap.parse_args()
    dev, Hq, D = "cuda", 32, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs; bf16, M=1, Hq={Hq}, D={D}; µs (TB/s)")
    for shape in args.shapes.split(","):
        B, N, Hkv = (int(x) for x in shape.split("x"))
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
        call = forward_call(q, k, v, [], [], None, D ** -0.5, 0.0, 0.0, -math.inf, "", [])
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=D ** -0.5)
        default = decode.default_config(call)
        kv_bytes = 2 * B * Hkv * N * D * 2
        rows = []
        grid = itertools.product(*(map(int, a.split(",")) for a in (args.block_n, args.splits_per_sm, args.stages,
                                                                    args.warps)))
        configs = {default}
        for block_n, per_sm, stages, warps in grid:
            splits = -(-per_sm * sms // (B * Hkv))
            configs.add(DecodeConfig(BLOCK_N=block_n, num_splits=splits, num_warps=warps, num_stages=stages))
        for cfg in sorted(configs, key=lambda c: (c.BLOCK_N, c.num_splits, c.num_stages, c.num_warps)):
            try:
                out, _ = decode.attention_forward(call, config=cfg)
                err = (out.float() - want.float()).abs().max().item()
                if not err <= 2e-2:
                    raise AssertionError(f"max error {err:.3g}")
                t = triton.testing.do_bench(lambda: decode.attention_forward(call, config=cfg), warmup=10, rep=50)
                rows.append((t * 1e3, cfg))
            except Exception as e:
                print(f"  {cfg.short()}: {type(e).__name__}: {str(e)[:80]}")
        rows.sort(key=lambda r: r[0])
        print(f"\nB={B} N={N} Hkv={Hkv}: best of {len(rows)}")
        for us, cfg in rows[:5] + [r for r in rows if r[1] == default]:
            mark = "  <- default" if cfg == default else ""
            print(f"  {us:8.1f} µs ({kv_bytes / us / 1e6:.2f} TB/s)  {cfg.short()}{mark}")


if __name__ == "__main__":
    main()
