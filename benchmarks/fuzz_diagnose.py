"""One fuzzer program, diagnosed: the op's call captured from the compiled run, then run by the
kernels and by the op's PyTorch reference (same dtype, same device) against the reference in
float64, per query row; and eager's own errors against the float64 run.

    PYTHONPATH=$PWD python benchmarks/fuzz_diagnose.py SEED     # a seed of benchmarks/fuzz_gpu.py
"""
import copy
import dataclasses
import sys

import torch
sys.path.insert(0, "tests"); sys.path.insert(0, "benchmarks")
import attention_programs as ap
from fuzz_gpu import captured_calls
from fusepass.ops import dispatch, reference

seed = int(sys.argv[1])
prog, verdict, calls = captured_calls(seed)
print(prog)
print("check_program:", verdict)
orig = dispatch.run_forward
for n, c in enumerate(calls[:2]):
    print(f"call {n}: q {tuple(c.q.shape)} {c.q.dtype} k {tuple(c.k.shape)} biases {[tuple(b.shape) for b in c.biases]} "
          f"masks {[tuple(m.shape) for m in c.masks]} scale {c.scale} softcap {c.softcap} fill {c.mask_fill} "
          f"expr {c.mask_expr!r} args {c.mask_args}")
    d = lambda t: t.double() if t.is_floating_point() else t
    c64 = dataclasses.replace(c, q=d(c.q), k=d(c.k), v=d(c.v), biases=tuple(d(b) for b in c.biases))
    o64, l64 = reference.attention_forward(c64)
    ok, lk = orig(c)
    orf, lrf = reference.attention_forward(c)
    for name, o, l in (("kernel", ok, lk), ("reference fp32", orf, lrf)):
        e = (o.double() - o64).abs().amax(-1).flatten()
        el = (l.double() - l64).abs().flatten()
        print(f"  {name}: out max err {e.max().item():.3e} (row {e.argmax().item()}), lse max err {el.max().item():.3e}")
    e_k = (ok.double() - o64).abs().amax(-1).flatten(); e_r = (orf.double() - o64).abs().amax(-1).flatten()
    worst = torch.argsort(e_k, descending=True)[:6]
    s = (c.q.double() @ c.k.double().transpose(-1, -2) * c.scale).flatten(0, -3)
    for r in worst.tolist():
        srow = s.reshape(-1, s.shape[-1])[r]
        print(f"   row {r}: kernel {e_k[r].item():.2e} ref32 {e_r[r].item():.2e} lse64 {l64.flatten()[r].item():.4f} "
              f"lsek {lk.flatten()[r].item():.4f} |s| max {srow.abs().max().item():.2f}")

dev = "cuda" if torch.cuda.is_available() else "cpu"
module, t = ap.build(prog, dev)
m1 = copy.deepcopy(module); eager = ap.execute(m1, m1, ap.fresh_leaves(t))
m2 = copy.deepcopy(module).double(); ref = ap.execute(m2, m2, ap.fresh_leaves(t, torch.float64))
for n, (e, r) in enumerate(zip(eager.outputs, ref.outputs)):
    err = (e.double() - r).abs()
    print(f"eager output {n}: max abs err {err.max().item():.3e}, rel {(err.norm() / r.norm()).item():.3e}")
for name in sorted(eager.grads):
    err = (eager.grads[name].double() - ref.grads[name]).abs()
    print(f"eager grad {name}: max abs err {err.max().item():.3e}")
