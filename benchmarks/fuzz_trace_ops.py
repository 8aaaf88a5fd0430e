"""One fuzzer program's eager forward traced per aten op: the program's dtype against its
float64 run (same op sequence), to see where eager's error arises on this device.

    PYTHONPATH=$PWD python benchmarks/fuzz_trace_ops.py SEED
"""
import copy, dataclasses, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, "tests"); sys.path.insert(0, "benchmarks")
import attention_programs as ap
from fuzz_gpu import program_for

class Record(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.outs = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        o = out[0] if isinstance(out, (tuple, list)) else out
        self.outs.append((str(func), o.detach().clone() if isinstance(o, torch.Tensor) else None))
        return out

seed = int(sys.argv[1])
dev = "cuda" if torch.cuda.is_available() else "cpu"
prog = program_for(seed, dataclasses.replace(ap.GPU, dtypes=("bfloat16", "float16", "float32")))
print(dev, prog)
module, t = ap.build(prog, dev)
runs = []
for dt in (None, torch.float64):
    m = copy.deepcopy(module)
    if dt is not None:
        m = m.double()
    leaves = ap.fresh_leaves(t, dt) if dt is not None else ap.fresh_leaves(t)
    rec = Record()
    with torch.no_grad(), rec:
        ap.execute(m, m, leaves)
    runs.append(rec.outs)
for (name, a), (name2, b) in zip(*runs):
    if a is None or b is None or not a.is_floating_point() or not b.is_floating_point() or a.shape != b.shape:
        print(f"{name:40s}"); continue
    err = (a.double() - b.to(a.device)).abs().max().item() if a.numel() else 0.0
    print(f"{name:40s} {tuple(a.shape)} max|fp32-fp64| {err:.3e}  max|x| {b.abs().max().item() if b.numel() else 0:.3e}")
