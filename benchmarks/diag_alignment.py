"""A q whose data pointer is 2 bytes off 16-byte alignment: fusepass's kernel (through the
Launcher and through JITFunction.run alone) and the op's PyTorch reference against SDPA on the
same q.

    PYTHONPATH=$PWD python benchmarks/diag_alignment.py [misaligned-first | aligned-first]
"""
import math, sys
import torch
from fusepass.kernels import forward, launcher
from fusepass.ops import reference
from fusepass.ops.dispatch import forward_call
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
order = sys.argv[1] if len(sys.argv) > 1 else "misaligned-first"
base = torch.randn(2 * 4 * 256 * 64 + 1, device=dev, dtype=dt)
qa = base[:-1].view(2, 4, 256, 64)
qm = base[1:].view(2, 4, 256, 64)
k, v = (torch.randn(2, 4, 256, 64, device=dev, dtype=dt) for _ in range(2))
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
for expr, causal in (("j <= i + (N - M)", True), ("", False)):
    for name, q in ((("misaligned", qm), ("aligned", qa)) if order == "misaligned-first" else (("aligned", qa), ("misaligned", qm))):
        call = forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, -math.inf, expr, [])
        ref = torch.nn.functional.scaled_dot_product_attention(q.contiguous(), k, v, is_causal=causal, scale=0.125)
        r32 = reference.attention_forward(call)[0]
        outs = [forward.attention_forward(call)[0] for _ in range(3)]
        torch.cuda.synchronize()
        print(f"{expr!r:22} {name:10} ptr%16={q.data_ptr() % 16:2d} reference {rel(r32, ref):.2e} "
              f"kernel calls {[f'{rel(o, ref):.2e}' for o in outs]} direct {dict(launcher.direct_launches)}", flush=True)
# A JITFunction.run launch alone, no Launcher, misaligned q, fresh plan (different head count).
q2 = torch.randn(1 * 2 * 128 * 64 + 1, device=dev, dtype=dt)[1:].view(1, 2, 128, 64)
k2, v2 = (torch.randn(1, 2, 128, 64, device=dev, dtype=dt) for _ in range(2))
call = forward_call(q2, k2, v2, [], [], None, 0.125, 0.0, 0.0, -math.inf, "", [])
orig = launcher.Launcher.__init__
def no_direct(self, *a, **kw):
    kw["direct"] = False
    orig(self, *a, **kw)
launcher.Launcher.__init__ = no_direct
o = forward.attention_forward(call)[0]
ref = torch.nn.functional.scaled_dot_product_attention(q2.contiguous(), k2, v2, scale=0.125)
print("JITFunction.run only, misaligned q:", f"{rel(o, ref):.2e}")
o = forward.attention_forward(forward_call(q2.contiguous(), k2, v2, [], [], None, 0.125, 0.0, 0.0, -math.inf, "", []))[0]
print("JITFunction.run only, same q copied (aligned):", f"{rel(o, ref):.2e}")
