"""Time the decode family's kernels over a grid of DecodeConfig values (to choose the
heuristic default in kernels/decode.py): bf16, one query per sequence, Hq=32, D=128.

Kernel time (triton.testing.do_bench: CUDA events around the two launches; with ``--graphs``
replayed from a CUDA graph, so that a short cache's host time does not hide the kernels), K+V
bytes read per µs as TB/s; the default config's row is marked.  ``--min-tiles`` also sweeps
decode.MIN_TILES_PER_SPLIT (the fewest key tiles a split walks), which bounds the split count
of short caches.

    PYTHONPATH=$PWD python benchmarks/sweep_decode.py [--shapes 8x16384x8,1x131072x8]
    PYTHONPATH=$PWD python benchmarks/sweep_decode.py --shapes 1x1024x8,8x1024x8 --min-tiles 1,2,4 --graphs
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
    ap.add_argument("--min-tiles", default=str(decode.MIN_TILES_PER_SPLIT), help="MIN_TILES_PER_SPLIT values")
    ap.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (GPU time only)")
    args = ap.parse_args()
    from bench_decode import graph_us  # benchmarks/ is the script's directory

    def timed(fn) -> float:
        return graph_us(fn) if args.graphs else triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
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
        default_tiles = decode.MIN_TILES_PER_SPLIT
        for tiles in map(int, args.min_tiles.split(",")):
            decode.MIN_TILES_PER_SPLIT = tiles
            for cfg in sorted(configs, key=lambda c: (c.BLOCK_N, c.num_splits, c.num_stages, c.num_warps)):
                try:
                    out, _ = decode.attention_forward(call, config=cfg)
                    err = (out.float() - want.float()).abs().max().item()
                    if not err <= 2e-2:
                        raise AssertionError(f"max error {err:.3g}")
                    splits = decode.splits_for(N, cfg)[0]
                    rows.append((timed(lambda: decode.attention_forward(call, config=cfg)), cfg, tiles, splits))
                except Exception as e:
                    print(f"  {cfg.short()} min tiles {tiles}: {type(e).__name__}: {str(e)[:80]}")
        decode.MIN_TILES_PER_SPLIT = default_tiles
        rows.sort(key=lambda r: r[0])
        print(f"\nB={B} N={N} Hkv={Hkv}: best of {len(rows)}")
        for us, cfg, tiles, splits in rows[:5] + [r for r in rows if r[1] == default and r[2] == default_tiles]:
            mark = "  <- default" if cfg == default and tiles == default_tiles else ""
            print(f"  {us:8.1f} µs ({kv_bytes / us / 1e6:.2f} TB/s)  {cfg.short()} min tiles {tiles} "
                  f"({splits} splits){mark}")


if __name__ == "__main__":
    main()
