"""Whether kernels/launcher.py's direct path engages on this Triton, and why not: the launch
hooks, what JITFunction.run returned, the compiled launcher's signature, the counters.

    PYTHONPATH=$PWD python benchmarks/diag_launcher.py
"""
import math, traceback, inspect
import torch, triton
from fusepass.kernels import launcher, forward
from fusepass.ops.dispatch import forward_call
print("triton", triton.__version__)
rt = launcher._runtime()
print("runtime:", rt)
if rt:
    knobs_rt = rt[0]
    for h in ("launch_enter_hook", "launch_exit_hook"):
        v = getattr(knobs_rt, h, "MISSING")
        print(h, type(v), repr(v)[:200], "unset:", launcher._unset(v), "attrs:", [a for a in dir(v) if not a.startswith("__")][:20])
q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
call = forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, -math.inf, "j <= i", [])
orig_remember = launcher.Launcher._remember
def remember(self, key, kernel, n_args):
    print("remember:", self.name, "kernel type", type(kernel), "has run/function/packed_metadata:",
          [hasattr(kernel, a) for a in ("run", "function", "packed_metadata", "result")])
    try:
        orig_remember(self, key, kernel, n_args)
    except Exception:
        traceback.print_exc()
    print("  after remember: direct", self._direct, "trailing", self._trailing, "kernels", len(self._kernels))
    if hasattr(kernel, "run"):
        try:
            print("  kernel.run signature:", inspect.signature(kernel.run))
        except Exception as e:
            print("  no signature", e)
launcher.Launcher._remember = remember
for i in range(3):
    try:
        out, lse = forward.attention_forward(call)
        torch.cuda.synchronize()
        print("call", i, "ok, direct launches", dict(launcher.direct_launches))
    except Exception:
        traceback.print_exc()
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125)
print("rel err vs sdpa", ((out.float() - ref.float()).norm() / ref.float().norm()).item())
import triton.runtime.jit as jit
src = inspect.getsource(jit.JITFunction.run)
i = src.find("kernel.run(")
print("JITFunction.run launches with:", src[i:i + 400])
