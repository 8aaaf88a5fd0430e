"""Where an fp32 score's error comes from: q.k of a fuzzer program's captured call computed by
cuBLAS (the device's fp32 matmul), by the CPU's, and by a Triton ``tl.dot`` (IEEE) over the
whole head dim or summed over chunks of it, each against float64.

    PYTHONPATH=$PWD python benchmarks/diag_fp32_dot.py SEED [SEED ...]   # seeds of benchmarks/fuzz_gpu.py
"""
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, "tests"); sys.path.insert(0, "benchmarks")
from fuzz_gpu import captured_calls  # noqa: E402


@triton.jit
def _scores(Q, K, S, M, N, D, BLOCK: tl.constexpr, D_P: tl.constexpr, CHUNK: tl.constexpr):
    # One BLOCK x BLOCK tile of q @ k^T for one (batch * head); the head dim is summed as
    # D_P // CHUNK fresh dots of CHUNK each, added in order.
    bh, tm, tn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = tm * BLOCK + tl.arange(0, BLOCK)
    offs_n = tn * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for c in tl.static_range(D_P // CHUNK):
        offs_d = c * CHUNK + tl.arange(0, CHUNK)
        q = tl.load(Q + bh * M * D + offs_m[:, None] * D + offs_d[None, :],
                    mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
        kT = tl.load(K + bh * N * D + offs_n[None, :] * D + offs_d[:, None],
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        acc += tl.dot(q, kT, input_precision="ieee")
    tl.store(S + bh * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def triton_scores(q, k, chunk):
    B, H, M, D = q.shape
    N = k.shape[2]
    qf = q.reshape(B * H, M, D).contiguous()
    kf = k.reshape(B * H, N, D).contiguous()
    s = torch.empty((B * H, M, N), dtype=torch.float32, device=q.device)
    d_p = triton.next_power_of_2(max(D, 16))
    chunk = min(chunk, d_p)
    _scores[(B * H, triton.cdiv(M, 32), triton.cdiv(N, 32))](qf, kf, s, M, N, D, BLOCK=32, D_P=d_p, CHUNK=chunk)
    return s.reshape(B, H, M, N)


def main() -> None:
    for seed in map(int, sys.argv[1:]):
        prog, verdict, calls = captured_calls(seed)
        print(f"seed {seed}: {prog}\n  check_program: {verdict}")
        if not calls:
            continue
        c = calls[0]
        G = c.groups
        k = c.k.repeat_interleave(G, 1)
        ref = (c.q.double() @ k.double().transpose(-1, -2))
        mag = ref.abs().max().item()
        rows = {
            "cuBLAS fp32": c.q @ k.transpose(-1, -2),
            "CPU fp32": (c.q.cpu() @ k.cpu().transpose(-1, -2)).to(c.q.device),
        }
        for chunk in (128, 64, 32, 16):
            rows[f"tl.dot chunk {chunk}"] = triton_scores(c.q, k, chunk)
        print(f"  q.k: D={c.head_dim}, |s| max {mag:.2f}, fp32 ulp there {torch.finfo(torch.float32).eps * mag:.2e}")
        for name, s in rows.items():
            err = (s.double() - ref).abs()
            print(f"    {name:18s} max err {err.max().item():.3e}  mean {err.mean().item():.3e}")


if __name__ == "__main__":
    main()
