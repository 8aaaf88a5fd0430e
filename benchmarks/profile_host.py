"""Host time of fused calls on the GPU: the compiled site, the op without autograd, SDPA
compiled and eager, one torch.empty; then cProfile of 2000 compiled calls (tottime), and a
training step through the compiled site, with the direct-launch counters.

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/profile_host.py
"""
import cProfile, pstats, time, math, io
import torch, fusepass
from fusepass.kernels import launcher
def attn(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(s, dim=-1) @ v
def wall(fn, n=2000):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
q = torch.randn(1, 1, 16, 64, device="cuda", dtype=torch.bfloat16)
f = torch.compile(attn, backend="fusepass")
sd = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v))
op = torch.ops.fusepass.attention_inference
g = lambda: op(q, q, q, [], [], None, 0.125, 0.0, 0.0, float("-inf"), "", [], "autotune=0")
with torch.no_grad():
    for name, fn in (("fused compile", lambda: f(q, q, q)), ("op inference", g), ("sdpa compile", lambda: sd(q, q, q)), ("sdpa eager", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)), ("torch.empty x1", lambda: torch.empty((1, 1, 16, 64), device="cuda", dtype=torch.bfloat16))):
        print(f"{name}: {wall(fn):.1f} us/call", flush=True)
    print("direct launches:", dict(launcher.direct_launches))
    for name, fn in (("fused compile", lambda: f(q, q, q)),):
        pr = cProfile.Profile(); pr.enable()
        for _ in range(2000): fn()
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue()[:9000])
qg = q.clone().requires_grad_()
fb = torch.compile(attn, backend="fusepass")
def step():
    fb(qg, qg, qg).sum().backward()
print(f"fused fwd+bwd compile: {wall(step, 500):.1f} us/step; direct launches {dict(launcher.direct_launches)}")
