"""Where the time of a fused call goes, on the GPU: the decode family's two kernels against the
prefill kernel (wall time per call and torch.profiler's kernel table), the host path of the op
called directly (cProfile), and whether a ``torch.library.triton_op`` around the forward
kernel compiles under Inductor.

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/profile_calls.py
"""
import cProfile, math, pstats, sys, time, traceback
import torch
from torch.profiler import ProfilerActivity, profile
import fusepass  # noqa
from fusepass.kernels import decode, forward
from fusepass.ops.dispatch import forward_call

def wall(fn, n=200):
    fn(); torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1e6

for B, N, Hkv, expr in [(8, 16384, 4, ""), (8, 16384, 32, ""), (8, 4096, 8, "j <= i + (N - M)")]:
    q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, N, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    call = forward_call(q, k, v, [], [], None, 128 ** -0.5, 0.0, 0.0, -math.inf, expr, [], "autotune=0")
    f = lambda: decode.attention_forward(call)
    f(); torch.cuda.synchronize()
    plan = next(iter(decode._plans._plans.values())) if decode._plans._plans else None
    print(f"== B={B} N={N} Hkv={Hkv} expr={expr!r}: wall {wall(f):.1f} us/call; prefill {wall(lambda: forward.attention_forward(call)):.1f}")
    for p in list(decode._plans._plans.values())[-1:]:
        print("   cfg", p.cfg, "tiles/split", p.tiles_per_split, "block_m", p.block_m)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10): f()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
# host path of the op, tiny shape
q = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
op = torch.ops.fusepass.attention
g = lambda: op(q, q, q, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [], "autotune=0")
print("op direct", wall(g, 2000))
pr = cProfile.Profile(); pr.enable()
for _ in range(3000): g()
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
sys.path.insert(0, "benchmarks")
import bench_overhead as bo  # noqa: E402
try:
    fn = bo.triton_op_launch(q, q, q); fn()
except Exception:
    traceback.print_exc(limit=3)
    s = traceback.format_exc(); i = s.find("Error"); print(s[-3000:])
