"""One fuzzer program's captured op call, run by the forward kernels at several tile sizes,
warp counts and pipelining depths against the op's reference (same dtype, same device): which
configs go wrong, and in which rows.

    PYTHONPATH=$PWD python benchmarks/diag_configs.py SEED [SEED ...]   # seeds of benchmarks/fuzz_gpu.py
"""
import os
import sys

import torch

sys.path.insert(0, "tests"); sys.path.insert(0, "benchmarks")
from fuzz_gpu import captured_calls  # noqa: E402

from fusepass.autotune.config import ForwardConfig  # noqa: E402
from fusepass.kernels import forward  # noqa: E402
from fusepass.ops import reference  # noqa: E402

CONFIGS = [(bm, bn, w, st) for bm, bn in ((16, 16), (32, 32), (64, 16), (64, 32), (64, 64), (128, 32))
           for w, st in ((4, 1), (4, 2), (4, 3), (8, 2))]
if os.environ.get("DIAG_CONFIGS"):  # e.g. "64x32w4s2,64x64w4s1"
    CONFIGS = [tuple(int(x) for x in c.replace("x", " ").replace("w", " ").replace("s", " ").split())
               for c in os.environ["DIAG_CONFIGS"].split(",")]


def main() -> None:
    for seed in map(int, sys.argv[1:]):
        prog, verdict, calls = captured_calls(seed)
        print(prog, prog.dtype)
        print("check_program:", verdict[:400])
        if not calls:
            print("no fused call")
            continue
        c = calls[0]
        print(f"q {tuple(c.q.shape)} {c.q.dtype} k {tuple(c.k.shape)} v {tuple(c.v.shape)} "
              f"biases {[tuple(b.shape) for b in c.biases]} masks {[tuple(m.shape) for m in c.masks]} "
              f"scale {c.scale} fill {c.mask_fill} expr {c.mask_expr!r} args {c.mask_args}")
        o_ref, l_ref = reference.attention_forward(c)
        vmean = c.v.double().mean(2, keepdim=True).repeat_interleave(c.groups, 1)
        for bm, bn, w, st in CONFIGS:
            try:
                o, lse = forward.attention_forward(c, config=ForwardConfig(BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                                                                           num_stages=st))
            except Exception as e:  # a config the device cannot run
                print(f"  {bm}x{bn} w{w} s{st}: {type(e).__name__}: {str(e)[:120]}")
                continue
            err = (o.double() - o_ref.double()).abs().amax(-1)
            rows = (err > 1e-3).nonzero().tolist()
            like_mean = ((o.double() - vmean).abs().amax(-1) < 1e-5)[err > 1e-3].sum().item()
            print(f"  {bm}x{bn} w{w} s{st}: out err {err.max().item():.3e}, lse err "
                  f"{(lse - l_ref).abs().nan_to_num(0).max().item():.3e}, bad rows {len(rows)} "
                  f"(first {rows[:4]}), of them equal to mean(V): {like_mean}")


if __name__ == "__main__":
    main()
