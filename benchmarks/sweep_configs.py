"""Time fusepass forward/backward over a few ForwardConfig / BackwardConfig values (to choose heuristics defaults).

    PYTHONPATH=$PWD python benchmarks/sweep_configs.py
"""

from __future__ import annotations

import math

import torch
import triton

from fusepass.autotune.config import BackwardConfig, ForwardConfig
from fusepass.kernels.backward import attention_backward
from fusepass.kernels.forward import attention_forward
from fusepass.ops.dispatch import backward_call, forward_call

FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 2)]
BWD = [(32, 128, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 3), (64, 128, 8, 1),
       (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 1), (32, 128, 8, 1)]


def main():
    import os

    dev = "cuda"
    N = int(os.environ.get("SWEEP_N", 4096))
    dims = [int(d) for d in os.environ.get("SWEEP_D", "64,128").split(",")]
    skip_fwd = os.environ.get("SWEEP_BWD_ONLY") == "1"
    for D in dims:
        H, B = 2048 // D, 16384 // N
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
        for causal in (False, True):
            expr = "j <= i + (N - M)" if causal else ""
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1)
            fcall = forward_call(q, k, v, [], [], None, D ** -0.5, 0.0, 0.0, -math.inf, expr, [])
            o, lse = attention_forward(fcall)
            bcall = backward_call(do, q, k, v, o, lse, [], [], None, D ** -0.5, 0.0, 0.0, -math.inf, expr, [], [])
            for c in ([] if skip_fwd else FWD):
                cfg = ForwardConfig(*c)
                try:
                    ms = triton.testing.do_bench(lambda: attention_forward(fcall, config=cfg), return_mode="median")
                    print(f"fwd D={D} causal={causal} {c}: {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
                except Exception as e:
                    print(f"fwd D={D} causal={causal} {c}: {type(e).__name__} {str(e)[:100]}", flush=True)
            for c in BWD:
                cfg = BackwardConfig(BLOCK_OWN=c[1], BLOCK_STEP=c[0], num_warps=c[2], num_stages=c[3])
                try:
                    ms = triton.testing.do_bench(lambda: attention_backward(bcall, config=cfg), return_mode="median")
                    print(f"bwd D={D} causal={causal} {c}: {2.5 * flops / ms / 1e9:.0f} TFLOP/s", flush=True)
                except Exception as e:
                    print(f"bwd D={D} causal={causal} {c}: {type(e).__name__} {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()
