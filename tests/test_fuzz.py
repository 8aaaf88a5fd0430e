"""Differential fuzzing: random attention programs, eager against fusepass.

``attention_programs.generate`` writes small attention modules the many ways real code does
(layouts, contractions, K transposes, scale placements, softmax spellings, masks from code
and from data, learned biases, GQA repeats, softcaps, dropout p=0, in-place writes around
and inside the attention, and near-misses that are not attention).  Each program runs
eagerly, under ``torch.compile(backend="fusepass")`` after a fresh ``torch._dynamo.reset()``,
and in float64; ``check_program`` compares outputs, gradients of inputs and parameters, and
the final values of mutated buffers and inputs (NaN and inf exactly where eager has them,
elsewhere the conftest rule: at most 4x eager's own error against float64 plus a floor), and
checks the fused counter: real attention with supported features must be fused, near-misses
must not be (``expected_fusion``).

Budget (fixed seed: ``derandomize=True``, no example database, shrinking off unless
``FUSEPASS_FUZZ_SHRINK=1``):

* ``test_fuzz_reference``: 300 programs on the op's CPU reference, inner compiler "eager" or
  "aot_eager" (drawn per program), all dtypes, backward for fp32/bf16.
* ``test_fuzz_interpreter``: 60 programs through the Triton kernels under Triton's interpreter
  (``options={"interpret": True}``), small shapes, outputs poisoned before the kernels write;
  a program that must be fused must also have launched the kernels.
* ``test_regression`` / ``test_kernel_regression``: one explicit, minimized program per
  distinct failure the fuzzer has found.
* ``test_generator_covers_every_dimension``: the budget's draws reach every spelling.

Each fuzz test runs its whole budget and then fails once, listing every failure grouped by
kind (each as a ``Program(...)`` to paste into REGRESSIONS).

Measured on the 2-core CI machine (torch 2.13 CPU, triton 3.9, 2026-12-01 23:20 UTC, other
test runs sharing the machine, load ~2): test_fuzz_reference 118 s, test_fuzz_interpreter
27 s (60 programs; 80 took 43 s), the regressions and the coverage check ~12 s: the whole
file about 2.7 minutes.  With the machine to itself, 200 reference programs took 61 s.
A program costs 0.2-1 s, almost all of it Dynamo tracing (the op's reference and the
interpreted kernels are tiny at these shapes).  To fuzz further:
``FUSEPASS_FUZZ_EXAMPLES=3000 pytest tests/test_fuzz.py -k fuzz_reference``, or
``python benchmarks/fuzz_gpu.py`` (CUDA, the real kernels; ``--n 5`` on CPU as a smoke test).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from attention_programs import (
    BADDBMMS, INTERPRETER, REFERENCE, Program, ProgramFailure, check_program, expected_fusion, generate,
)

# Measured wall time of the two fuzz tests on this 2-core machine (see the module docstring).
BUDGET = {"reference": (300, "118 s"), "interpreter": (60, "27 s")}
REFERENCE_EXAMPLES = int(os.environ.get("FUSEPASS_FUZZ_EXAMPLES", BUDGET["reference"][0]))
INTERPRETER_EXAMPLES = int(os.environ.get("FUSEPASS_FUZZ_INTERPRETER_EXAMPLES", BUDGET["interpreter"][0]))
# NOTE: shrinking re-runs hundreds of programs (minutes each failure); CI reports the drawn
# program instead, which prints as a Program(...) call to paste into REGRESSIONS.
SHRINK = os.environ.get("FUSEPASS_FUZZ_SHRINK") == "1"
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if SHRINK else ())


def programs(profile):
    @st.composite
    def draw_program(draw):
        return generate(lambda name, options: draw(st.sampled_from(list(options))), profile)

    return draw_program()


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples, derandomize=True, deadline=None, database=None, phases=PHASES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
        print_blob=False,
    )


def run_budget(examples: int, profile, check) -> None:
    """Run ``examples`` programs; fail once at the end with every failure, grouped by kind.

    NOTE: hypothesis would stop at the first failure; a fuzz run that lists all of them (and
    always costs the same time) is more use in CI.  FUSEPASS_FUZZ_SHRINK=1 stops at the first
    failure instead and shrinks it.
    """
    failures: list[ProgramFailure] = []

    @fuzz_settings(examples)
    @given(prog=programs(profile), inner=st.sampled_from(["eager", "aot_eager"]))
    def one_program(prog, inner):
        try:
            check(prog, inner)
        except ProgramFailure as failure:
            if SHRINK:
                raise
            failures.append(failure)

    one_program()
    if failures:
        kinds: dict[str, list[ProgramFailure]] = {}
        for f in failures:
            kinds.setdefault(f.kind, []).append(f)
        lines = [f"{len(failures)} of {examples} programs failed, {len(kinds)} kinds:"]
        for kind, fs in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"--- {len(fs)} x {kind}; for example:")
            lines.extend(str(f) for f in fs[:2])
        raise AssertionError("\n".join(lines))


def test_fuzz_reference():
    run_budget(REFERENCE_EXAMPLES, REFERENCE, lambda prog, inner: check_program(prog, {"inner": inner}))


@pytest.fixture
def kernels_in_interpreter(tmp_path, monkeypatch):
    """Kernels under Triton's interpreter, outputs poisoned (NaN) before they run; yields a
    counter of forward kernel launches."""
    pytest.importorskip("triton")
    from fusepass.kernels import launch_common

    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path / "fusepass-cache"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launch_common, "poison_outputs", True)
    yield _ForwardLaunches()


class _ForwardLaunches:
    """``launches["forward"]``: forward kernel launches of either family so far."""

    def __getitem__(self, key: str) -> int:
        from fusepass.kernels import launch_common

        return launch_common.forward_launches()


INTERPRET = {"inner": "eager", "interpret": True, "autotune": False}


def check_on_kernels(prog, launches, inner: str = "eager"):
    before = launches["forward"]
    check_program(prog, {**INTERPRET, "inner": inner})
    if expected_fusion(prog) and launches["forward"] == before:
        raise ProgramFailure("kernels did not run", prog, "fused, but the op ran its reference, not the Triton kernels")


def test_fuzz_interpreter(kernels_in_interpreter):
    run_budget(INTERPRETER_EXAMPLES, INTERPRETER, lambda prog, inner: check_on_kernels(prog, kernels_in_interpreter, inner))


# ---------------------------------------------------------------- regressions
# One program per distinct failure the fuzzer found, minimized; the comment says what failed
# and where ("HEAD" is commit 8c99e83, "tree" the working tree of 2026-12-01 evening).  They stay here until fusepass is fixed.  Two are refusals with a
# reason (right numbers, not fused), marked strict xfail so that fusing them one day shows.
REGRESSIONS = {
    # In-place writes around the attention were dropped (HEAD): the buffer / input kept its old value.
    "counter buffer add_": Program(M=1, N=1, inplace="counter"),
    "input add_ then used as a bias": Program(H=1, M=3, N=1, D=3, bias="input", bias_shape="1MN", inplace="input.add_"),
    # KV cache written with index_copy_: no gradient reached the new k and v (HEAD).
    "kv cache index_copy_ gradients": Program(M=1, N=18, past=17, masks=("causal_tril_buffer/+ zeros.masked_fill/min",),
                                              inplace="kv_cache.index_copy_"),
    # In-place ops inside the attention misread (HEAD): wrong numbers or NaN where eager is finite.
    "scores div_": Program(H=1, M=3, scale="s.div_"),
    "q mul_ on the projection": Program(source="proj", M=3, scale="q.mul_"),
    "mask built by full + masked_fill_": Program(H=1, M=3, masks=("causal_tril_buffer/+ full.masked_fill_/min",), grad=False),
    "mask built by full + masked_fill_ (-inf)": Program(M=1, N=1, D=3, masks=("pad_left/+ full.masked_fill_/-inf",), grad=False),
    "scores masked_fill_": Program(H=1, M=3, N=1, D=3, scale="q and k split", masks=("pad_all/masked_fill_/-inf",)),
    # ... and a crash reading it (HEAD): AttributeError: 'bool' object has no attribute 'subs'.
    "mask built by full + masked_fill_, crash": Program(H=1, M=3, N=1, D=3, masks=("band/+ full.masked_fill_/min",)),
    # Two additive finfo.min masks, causal then left padding (HEAD): rows whose visible keys are all
    # padded differ (eager: uniform over the keys masked once).
    "two additive finite masks": Program(masks=("causal_arange/+ zeros.masked_fill/min", "pad_left/+ zeros.masked_fill/min")),
    # einsum P·V with a token-major output (token axis before head axis) not fused (HEAD).
    "einsum bhij,bjhd->bihd": Program(H=1, M=1, N=1, D=3, pv="einsum", pv_eq="bhij,bjhd->bihd", v_store="bnhd",
                                      out_store="bnhd"),
    "einsum token-major end to end": Program(source="proj", qk="einsum", pv="einsum", qk_eq="bihd,bjhd->bhij",
                                             pv_eq="bhij,bjhd->bihd", q_store="bnhd", k_store="bnhd", v_store="bnhd",
                                             out_store="bnhd", k_form=""),
    # Crashes in the rewrite for rank 2 / 3 (HEAD): AttributeError: 'NoneType' object has no attribute 'dim'.
    "rank 2 k.t()": Program(rank=2, B=1, H=1, k_form=".t()"),
    "rank 3 einsum with K stored [D, N]": Program(rank=3, B=1, H=1, M=1, N=1, D=3, qk="einsum", qk_eq="zxv,zvw->zxw",
                                                  k_store="bhdn"),
    # A 0-d float16 scale folded without rounding to float16 (HEAD).
    "0-d float16 scale": Program(H=1, M=1, N=3, scale="* 0-d tensor", scale_dtype="float16"),
    # A bias written on the left (b + s) and then an additive mask: the walk back from softmax
    # takes the mask's side, "unsupported op ... zeros" / "... sub" (HEAD and tree).
    "b + s, then an additive mask": Program(B=1, H=1, M=1, N=1, bias="input", bias_shape="MN", bias_op="b + s",
                                            masks=("random/+ zeros.masked_fill/min",)),
    # dynamic=True (symbolic sizes and floats).
    # torch.full with a symbolic size: TypeError: 'Node' object is not iterable (HEAD).
    "dynamic: torch.full mask": Program(H=1, M=1, masks=("pad_all/+ full.masked_fill_/min",), dynamic=True),
    # The softcap's factor is a symbolic float: "a symbolic scale is applied after ... a softcap" (HEAD and tree).
    # Refused with that reason (right numbers; expected_fusion says so): the op's softcap is a
    # compile-time float.
    "dynamic: softcap": Program(B=1, H=1, M=1, N=1, softcap="tanh(s / c) * c", dynamic=True),
    # nn.Dropout's p is a symbolic float: the first graph is refused, "unsupported op ... dropout"
    # (HEAD; in eval mode fixed in the tree, in training mode with p=0.0 not).
    "dynamic: nn.Dropout eval": Program(B=1, H=1, M=1, D=3, dropout="nn.Dropout eval", dynamic=True),
    "dynamic: nn.Dropout(0.0) training": Program(B=1, H=1, M=1, D=3, dropout="nn.Dropout(0.0)", dynamic=True),
    # A mask sized by s.size(-2), s.size(-1): the size reads count as users of the scores,
    # "a score intermediate has 5 users" (HEAD and tree).
    # Refused with that reason (right numbers): fusing would keep the scores alive for their sizes.
    "dynamic: mask sized from the scores": pytest.param(
        Program(source="proj", H=1, N=1, D=3, masks=("causal_tril_buffer/+ triu(full)/min",), dynamic=True),
        marks=pytest.mark.xfail(strict=True, reason="refused: the scores' sizes are read")),
    # float16: two additive finfo.min masks hiding the same key sum to -inf in eager (a NaN row);
    # the op adds them in float32 and stays finite (tree).
    "float16 two additive finite masks": Program(dtype="float16", B=1, H=1, M=1, N=1, grad=False,
                                                 masks=("random_empty_row/+ zeros.masked_fill/min",
                                                        "pad_all/+ zeros.masked_fill/min")),
    # bfloat16, 33 keys, a row with every key masked by -inf: eager's row is NaN, the op's finite
    # (reference and kernels; float32 or 8 keys agree) (HEAD and tree).
    "bfloat16 row with no visible key, 33 keys": Program(dtype="bfloat16", B=1, M=33, N=33,
                                                         masks=("random_empty_row/masked_fill/-inf",)),
    # bfloat16 scores hold a -1e4 fill as -9984; the op replaced by -10000.0 while the additive
    # mask kept as a bias holds -9984, so in fully hidden rows the two sets of keys no longer
    # tie (GPU fuzzer seeds 905098 and 505064, 2026-12-02; errors up to 1.9) (376db2e).
    "bfloat16 -1e4 fill beside an additive -1e4 mask": Program(
        dtype="bfloat16", H=1, M=17, N=17, bias="input", bias_shape="1HMN", grad=False,
        masks=("random/+ full.masked_fill_/-1e4", "window/where_reversed/-1e4")),
    "bfloat16 -1e4 fill beside an additive -1e4 mask, training": Program(
        dtype="bfloat16", H=1, M=33, N=33, bias="input", bias_shape="MN",
        masks=("random/+ zeros.masked_fill/-1e4", "window/where/-1e4")),
    "bfloat16 -1e9 fill beside an additive -1e9 mask": Program(
        dtype="bfloat16", B=1, H=1, M=17, N=17, bias="input", bias_shape="MN", grad=False,
        masks=("pad_left/+ zeros.masked_fill/-1e9", "causal_tril_buffer/where_reversed/-1e9")),
    # ... and a -1e4 fill on bfloat16 scores (-9984) still fuses (seed 505104).
    "bfloat16 -1e4 fill fuses": Program(dtype="bfloat16", B=1, H=1, M=64, N=64, grad=False,
                                        masks=("causal_tril/masked_fill/-1e4",)),
}
# Failures of the Triton kernels (run under the interpreter).
KERNEL_REGRESSIONS = {
    # Rows with no visible key and a -inf fill: eager's dV is NaN for the whole (batch, head),
    # the kernels' is finite (HEAD).
    "empty rows, -inf: dV NaN": Program(masks=("random_empty_row/masked_fill/-inf",)),
    "causal + left padding, -inf: dV NaN": Program(masks=("causal_arange/masked_fill/-inf", "pad_left/masked_fill/-inf")),
    # bfloat16, 33 keys, a row with no visible key: finite where eager is NaN (HEAD and tree).
    "bfloat16 row with no visible key, 33 keys": Program(dtype="bfloat16", B=1, M=33, N=33,
                                                         masks=("random_empty_row/masked_fill/-inf",)),
    # One-hot rows (one key, or one visible key behind finite fills): eager's dq/dk are exactly
    # 0 there, the kernels' ds = p * (dp - Delta) left 1e-5..6e-5 of rounding (GPU seeds 695040,
    # 895066, 395040; reproduced in the interpreter).  Now ds = 0 where p == 1.
    "one key, causal finite mask: dq/dk exactly 0": Program(
        rank=2, B=1, H=1, M=129, N=1, D=40, Dv=128, qk="einsum", pv="Tensor.matmul", qk_eq="id,dj->ij",
        k_store="bhdn", k_form="", scale="none", masks=("causal_tril/+ full.masked_fill_/min",),
        softmax="torch.softmax", dynamic=True),
    "three keys, band and left padding at -1e9: one-hot rows": Program(
        rank=3, B=1, H=4, M=33, N=3, D=128, Dv=80, qk="Tensor.matmul", pv="einsum", pv_eq="bij,bjd->bid",
        k_form=".mT", scale="none", masks=("pad_left/masked_fill/-1e9", "band/where/-1e9")),
    "GQA, three keys, -inf and -1e9 masks and a learned bias: one-hot rows": Program(
        B=1, H=8, groups=2, M=257, N=3, D=80, Dv=16, qk="torch.matmul", k_form="transpose(pos)",
        gqa="repeat_interleave", scale="none", bias="param", bias_shape="N",
        masks=("pad_left/+ full.masked_fill_/-inf", "random/where/-1e9"), softmax="dim=s.dim()-1"),
}


@pytest.mark.parametrize("prog", [
    pytest.param(*p.values, marks=p.marks, id=name) if hasattr(p, "marks") else pytest.param(p, id=name)
    for name, p in REGRESSIONS.items()
])
def test_regression(prog, request):
    # The strict-xfail refusals must fail for the refusal itself, whatever expected_fusion says.
    must_fuse = any(m.name == "xfail" for m in request.node.iter_markers())
    check_program(prog, {"inner": "aot_eager"}, expected=True if must_fuse else "auto")


@pytest.mark.parametrize("prog", [pytest.param(p, id=name) for name, p in KERNEL_REGRESSIONS.items()])
def test_kernel_regression(prog, kernels_in_interpreter):
    check_on_kernels(prog, kernels_in_interpreter)


def test_generator_covers_every_dimension():
    """The fixed-seed budget's strategy draws every spelling of every dimension (a change to
    the generator that starves a dimension fails here instead of silently fuzzing less)."""
    from attention_programs import (
        DROPOUTS, INPLACE, K_FORMS, MASK_APPLIES, MASK_FILLS, MASK_PATTERNS, NEAR_MISSES, SCALES, SOFTCAPS, SOFTMAXES,
    )

    seen: dict[str, set] = {}

    def record(field, value):
        seen.setdefault(field, set()).add(value)

    @fuzz_settings(REFERENCE_EXAMPLES)
    @given(prog=programs(REFERENCE))
    def collect(prog):
        for field in ("scale", "softmax", "softcap", "dropout", "inplace", "near_miss", "k_form", "rank", "dtype",
                      "source", "gqa", "dynamic", "grad"):
            record(field, getattr(prog, field))
        record("contraction", prog.qk)
        record("contraction", prog.pv)
        record("layouts", (prog.q_store, prog.k_store, prog.v_store, prog.out_store))
        for mask in prog.masks:
            for part, value in zip(("mask pattern", "mask apply", "mask fill"), mask.split("/")):
                record(part, value)
        record("masks", len(prog.masks))
        record("expected", expected_fusion(prog))

    collect()
    wanted = {
        "scale": set(SCALES), "softmax": set(SOFTMAXES), "softcap": set(SOFTCAPS) | {""},
        "dropout": set(DROPOUTS) | {""}, "inplace": set(INPLACE) | {""}, "near_miss": set(NEAR_MISSES) | {""},
        "k_form": set(K_FORMS) - {".T"} | {""},  # .T: rank 2 only, rarely drawn "mask pattern": set(MASK_PATTERNS), "mask apply": set(MASK_APPLIES),
        "mask fill": set(MASK_FILLS), "masks": {0, 1, 2}, "rank": {2, 3, 4}, "dtype": {"float32", "bfloat16", "float16"},
        "source": {"leaves", "proj"}, "gqa": {"", "repeat_kv", "repeat_interleave"}, "dynamic": {False, True},
        "grad": {False, True}, "expected": {True, False, None},
        "contraction": {"@", "torch.matmul", "Tensor.matmul", "torch.bmm", "einsum", *BADDBMMS},
        "layouts": {("bnhd", "bnhd", "bnhd", "bnhd"), ("bhnd", "bhdn", "bhnd", "bhnd")},
    }
    for field, values in wanted.items():
        assert values <= seen[field], f"{field}: never drawn in {REFERENCE_EXAMPLES} programs: {values - seen[field]}"
