"""Differential fuzzing through the real Triton kernels: N random attention programs
(tests/attention_programs.py), each run eagerly, under fusepass, and in float64, on CUDA.

Program i is drawn from ``random.Random(seed + i)``, so a failure is reproduced by its seed
alone (``--only-seed``).  Prints a summary (programs, fused, kernels run, failures grouped by
kind with their seeds and programs) and writes every failure as one JSON line to ``--out``.

    PYTHONPATH=$PWD python benchmarks/fuzz_gpu.py                      # 2000 programs, CUDA
    PYTHONPATH=$PWD python benchmarks/fuzz_gpu.py --inner inductor --dtypes bfloat16,float16
    PYTHONPATH=$PWD python benchmarks/fuzz_gpu.py --only-seed 1234     # one program, verbose
    PYTHONPATH=$PWD python benchmarks/fuzz_gpu.py --n 5                # CPU: a smoke test, kernels
                                                                       # in Triton's interpreter (slow)

On a machine without CUDA the kernels run in Triton's interpreter (``interpret=True``) at the
interpreter's small sizes; ``--reference`` runs the op's PyTorch reference instead.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import attention_programs as ap  # noqa: E402


def program_for(seed: int, profile: ap.Profile) -> ap.Program:
    rng = random.Random(seed)
    return ap.generate(lambda name, options: rng.choice(list(options)), profile)


def captured_calls(seed: int) -> tuple[ap.Program, str, list]:
    """Program ``seed`` (any dtype) run once as this script runs it: the program, the verdict,
    and the op calls the compiled run handed to the launchers (the diag_* scripts' input)."""
    from fusepass.ops import dispatch

    prog = program_for(seed, dataclasses.replace(ap.GPU, dtypes=("bfloat16", "float16", "float32")))
    calls, orig = [], dispatch.run_forward

    def capture(call):
        calls.append(call)
        return orig(call)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    opts = {"inner": "aot_eager"} if dev == "cuda" else {"inner": "aot_eager", "interpret": True, "autotune": False}
    dispatch.run_forward = capture
    try:
        ap.check_program(prog, opts, device=dev)
        verdict = "passed"
    except ap.ProgramFailure as f:
        verdict = f"{f.kind}: {f.detail}"
    finally:
        dispatch.run_forward = orig
    return prog, verdict, calls


@contextlib.contextmanager
def counting_kernel_launches():
    """``launches["forward"]``: forward kernel launches of either family so far (the launchers' counter)."""
    from fusepass.kernels import launch_common

    class Launches:
        def __getitem__(self, key: str) -> int:
            return launch_common.forward_launches()

    yield Launches()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="programs to run (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first program; program i uses seed + i")
    parser.add_argument("--only-seed", type=int, default=None, help="run just this program and print it")
    parser.add_argument("--inner", default="aot_eager", choices=["eager", "aot_eager", "inductor"])
    parser.add_argument("--dtypes", default="bfloat16,float16,float32", help="comma-separated subset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference", action="store_true", help="CPU: the op's reference instead of the kernels")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--out", default="fuzz_failures.jsonl", help="failures, one JSON object a line")
    parser.add_argument("--profile", choices=["gpu", "interpreter", "reference"], default=None,
                        help="sizes to draw from (default: the device's); --profile gpu on CPU replays a GPU "
                             "program's seed in the interpreter")
    args = parser.parse_args(argv)

    on_cuda = args.device.startswith("cuda")
    base = ap.GPU if on_cuda else (ap.REFERENCE if args.reference else ap.INTERPRETER)
    if args.profile:
        base = {"gpu": ap.GPU, "interpreter": ap.INTERPRETER, "reference": ap.REFERENCE}[args.profile]
    profile = dataclasses.replace(base, dtypes=tuple(args.dtypes.split(",")))
    options = {"inner": args.inner}
    if not on_cuda and not args.reference:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        options.update(interpret=True, autotune=False)
    seeds = [args.only_seed] if args.only_seed is not None else range(args.seed, args.seed + args.n)

    failures: dict[str, list] = collections.defaultdict(list)
    stats = collections.Counter()
    start = time.time()
    out = None  # the failures file, created at the first failure
    with counting_kernel_launches() as launches:
        for seed in seeds:
            if args.minutes is not None and time.time() - start > 60 * args.minutes:
                print(f"stopping after {args.minutes} min")
                break
            prog = program_for(seed, profile)
            if args.only_seed is not None:
                print(prog)
            before = launches["forward"]
            stats["programs"] += 1
            try:
                counters = ap.check_program(prog, options, device=args.device)
            except ap.ProgramFailure as failure:
                kind, detail = failure.kind, failure.detail
            except Exception as exc:  # noqa: BLE001 - the harness itself broke on this program
                kind, detail = f"harness {type(exc).__name__}", str(exc)[:2000]
            else:
                kind = None
                stats["fused sites"] += counters.get("attention_fused", 0)
                stats["rejected sites"] += counters.get("attention_rejected", 0)
                stats["programs fused"] += bool(counters.get("attention_fused"))
                stats["programs on the kernels"] += launches["forward"] > before
            if kind is not None:
                failures[kind].append((seed, prog))
                out = out or open(args.out, "w")
                out.write(json.dumps({"seed": seed, "kind": kind, "program": str(prog), "options": options,
                                      "device": args.device, "detail": detail}) + "\n")
                out.flush()
                if args.only_seed is not None:
                    print(detail)
            if stats["programs"] % 100 == 0:
                print(f"{stats['programs']} programs, {sum(map(len, failures.values()))} failures, "
                      f"{time.time() - start:.0f} s", flush=True)

    if out is not None:
        out.close()
    elapsed = time.time() - start
    print(f"\n{stats['programs']} programs in {elapsed:.0f} s on {args.device} "
          f"({torch.cuda.get_device_name() if on_cuda else 'CPU'}), inner={args.inner}, options={options}")
    print(f"fused: {stats['programs fused']} programs ({stats['fused sites']} sites), "
          f"rejected sites: {stats['rejected sites']}, programs that ran the kernels: {stats['programs on the kernels']}")
    n_fail = sum(map(len, failures.values()))
    print(f"failures: {n_fail} in {len(failures)} kinds" + (f" (written to {args.out})" if n_fail else ""))
    for kind, items in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(items):5d}  {kind}")
        for seed, prog in items[:3]:
            print(f"         seed {seed}: {prog}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
