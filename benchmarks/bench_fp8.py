"""The FP8 forward (kernels/fp8.py) beside the bf16 kernel and SDPA (flash, cuDNN), same run.

bf16 inputs, B=4, H=16, causal and not, D=64/128.  "fp8" is the whole call (rotation and
quantization in PyTorch, then the e4m3 kernel); "fp8 kernel" the e4m3 kernel alone on inputs
quantized once.  TFLOP/s count 4 * B * H * M * N * D (halved when causal); the relative RMS
error against float64 (on FlashAttention-3's outlier inputs: N(0, 1) plus N(0, 100) at 0.1%)
is printed beside.

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/bench_fp8.py [--seqs 4096,8192]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusepass  # noqa: F401
from fusepass.kernels import forward, fp8
from fusepass.ops.dispatch import forward_call


def outliers(shape, gen):
    x = torch.randn(shape, generator=gen, device="cuda")
    spikes = torch.rand(shape, generator=gen, device="cuda") < 1e-3
    return (x + spikes * torch.randn(shape, generator=gen, device="cuda") * 10.0).to(torch.bfloat16)


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="4096,8192")
    args = ap.parse_args()
    B, H = 4, 16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={B} H={H} bf16 inputs; TFLOP/s "
          "(relative RMS error against float64 on outlier inputs)\n")
    print("| N | D | causal | bf16 kernel | fp8 | fp8 kernel | SDPA flash | SDPA cuDNN |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for N in map(int, args.seqs.split(",")):
        for D in (64, 128):
            for causal in (False, True):
                q, k, v = (outliers((B, H, N, D), gen) for _ in range(3))
                expr = "j <= i + (N - M)" if causal else ""
                call = forward_call(q, k, v, [], [], None, D ** -0.5, 0.0, 0.0, -math.inf, expr, [], "autotune=0")
                x = fp8.quantize(q, k, v)
                qcall = forward_call(x.q, x.k, x.v, [], [], None, D ** -0.5, 0.0, 0.0, -math.inf, expr, [],
                                     "autotune=0")
                scales = (x.q_scale, x.k_scale, x.v_scale)
                flops = 4 * B * H * N * N * D / (2 if causal else 1)
                # The reference on one batch element (float64 at N=8k is large).
                s = (q[:1].double() @ k[:1].double().transpose(-1, -2)) * D ** -0.5
                if causal:
                    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device="cuda").triu(1), -math.inf)
                ref = torch.softmax(s, -1) @ v[:1].double()
                del s

                def err(out):
                    return ((out[:1].double() - ref).norm() / ref.norm()).item()

                fns = {
                    "bf16": lambda: forward.attention_forward(call)[0],
                    "fp8": lambda: fp8.attention_forward(call)[0],
                    "fp8 kernel": lambda: forward.attention_forward(qcall, scales=scales, out_dtype=q.dtype)[0],
                    "flash": lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal),
                    "cudnn": lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal),
                }
                cells = []
                for name, fn in fns.items():
                    try:
                        e = err(fn())
                        cells.append(f"{flops / us(fn) / 1e6:.0f} ({e:.3g})")
                    except Exception as ex:  # a backend this build lacks: say so
                        cells.append(f"{type(ex).__name__}")
                print(f"| {N} | {D} | {causal} | " + " | ".join(cells) + " |", flush=True)
                del ref


def _sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


if __name__ == "__main__":
    main()
