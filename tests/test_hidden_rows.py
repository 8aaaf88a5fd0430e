"""Rows hidden by large fills, through the op (reference and Triton kernels) against eager.

Models hide keys in two ways: a bool mask or predicate whose scores are replaced by the fill,
or an additive bias of a large finite value (transformers' ``finfo(dtype).min``, BERT's
``(1 - mask) * -1e9``).  A row whose every key is hidden that way is uniform in eager, because
eager sums the scores in fp32 (the fill absorbs q.k) and softmax subtracts the row max; two
``finfo.min`` biases on one key sum to -inf in fp32.  A row whose every score is -inf is NaN
in eager, and so are the gradients that flow through it.  The op must give eager's values in
each case, forward and backward, from both of its implementations.

The float64 reference evaluates the op's formula with the scores summed as eager sums them in
fp32 (each partial sum rounded to fp32: that is where -1e9 absorbs q.k and where two finfo.min
sum to -inf) and everything else in float64; the comparison is the project's rule
(``assert_close_to_reference``).  Outputs of the kernels are poisoned before they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import fusepass.ops.attention  # noqa: F401  (registers torch.ops.fusepass.*)
from conftest import assert_close_to_reference
from fusepass.masks.predicate import dense_keep
from fusepass.ops import reference
from fusepass.ops.dropout import keep_mask

triton = pytest.importorskip("triton")

from fusepass.kernels import launch_common  # noqa: E402
from fusepass.ops.dispatch import forward_call, kernel_reason  # noqa: E402

CAUSAL = "j <= i + (N - M)"


@dataclass(frozen=True)
class Case:
    name: str
    B: int = 2
    Hkv: int = 2
    G: int = 1
    M: int = 40  # the interpreter's kernels use 32 x 32 tiles: several per row and column
    N: int = 36
    D: int = 16
    biases: tuple[str, ...] = ()  # kinds, see make_bias
    mask: str = ""  # "", "deadrows", "lastrows"
    expr: str = ""
    fill: float | str = float("-inf")  # "min": finfo(dtype).min
    softcap: float = 0.0
    dropout_p: float = 0.0


def _fmin(dtype):
    return torch.finfo(dtype).min


def make_bias(kind: str, case: Case, dtype: torch.dtype) -> torch.Tensor:
    B, Hq, M, N = case.B, case.Hkv * case.G, case.M, case.N
    i = torch.arange(M).view(M, 1)
    j = torch.arange(N).view(1, N)
    pad = torch.tensor([0, 7] + [3] * (B - 2))[:B].view(B, 1, 1, 1)  # left padding per batch
    if kind == "llama":  # transformers' causal + left-padding mask, as an additive finfo.min bias
        hidden = (j > i + (N - M)) | (j < pad)
        return torch.zeros(B, 1, M, N, dtype=dtype).masked_fill(hidden, _fmin(dtype))
    if kind == "leftpad":  # left padding only: rows i < pad see only padded keys under causal
        hidden = (j < pad) | (i < pad).expand(B, 1, M, 1)
        return torch.zeros(B, 1, M, N, dtype=dtype).masked_fill(hidden, _fmin(dtype))
    if kind == "bert":  # BERT's extended mask; batch 1 fully padded
        mask = torch.ones(B, N)
        mask[1] = 0
        mask[0, N - 5:] = 0
        return ((1.0 - mask) * -1e9).to(dtype).view(B, 1, 1, N)
    if kind in ("min_a", "min_b"):
        # Two finfo.min biases: in batch 1, rows < 6 have keys 0..9 hidden by a only, 10..13 by
        # both (-inf in fp32), 14.. by b only; in batch 0 both hide every key of row 2 (a row
        # of -inf: NaN) and a hides keys 0..4 of every row.
        b = torch.zeros(B, Hq, M, N, dtype=dtype)
        lo, hi = (0, 14) if kind == "min_a" else (10, N)
        b[1, :, :6, lo:hi] = _fmin(dtype)
        b[0, :, 2, :] = _fmin(dtype)
        if kind == "min_a":
            b[0, :, :, :5] = _fmin(dtype)
        return b
    if kind == "noise":
        return torch.randn(B, 1, M, N, dtype=torch.float64).to(dtype)
    raise AssertionError(kind)


def make_mask(kind: str, case: Case) -> list[torch.Tensor]:
    B, M, N = case.B, case.M, case.N
    if not kind:
        return []
    if kind == "deadrows":  # rows 3 and 4 of batch 0 see nothing; the rest a random 80%
        keep = torch.rand(B, 1, M, N) < 0.8
        keep[0, :, 3:5] = False
        return [keep]
    if kind == "lastrows":  # the last 32 rows of batch 1 see nothing: whole tiles are skipped
        keep = torch.ones(B, 1, M, N, dtype=torch.bool)
        keep[1, :, M - 32:] = False
        return [keep]
    raise AssertionError(kind)


def fill_of(case: Case, dtype: torch.dtype) -> float:
    return _fmin(dtype) if case.fill == "min" else float(case.fill)


def dense(q, k, v, biases, masks, case: Case, fill: float, seed: int, fp32_scores: bool):
    """The op's formula on whole tensors: in q's dtype (eager), or in float64 with the score sum
    rounded to fp32 after every term (``fp32_scores``: the reference of eager's fp32 sum)."""
    B, Hq, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k = k.repeat_interleave(G, 1)
    v = v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * case.D**-0.5
    if case.softcap > 0:
        s = case.softcap * torch.tanh(s / case.softcap)
    for b in biases:
        s = s + b.to(s.dtype)
        if fp32_scores:  # round to fp32 (overflow to -inf included), the gradient unchanged
            s32 = s.detach().float().double()
            s = s + torch.where(torch.isinf(s32) & (s32 == s.detach()), 0.0, s32 - s.detach())
    keep = torch.ones(B, Hq, M, N, dtype=torch.bool)
    for m in masks:
        keep = keep & m
    if case.expr:
        keep = keep & dense_keep(case.expr, B, Hq, M, N, [])
    s = torch.where(keep, s, torch.tensor(fill, dtype=s.dtype))
    sm = s if s.dtype == torch.float64 else s.float()
    p = torch.softmax(sm, -1).to(s.dtype)
    if case.dropout_p > 0:
        rows = torch.arange(B * Hq * M).view(B, Hq, M, 1)
        p = p * keep_mask(seed, rows, torch.arange(N).view(1, N), case.dropout_p) / (1 - case.dropout_p)
    return p @ v, torch.logsumexp(sm.detach(), -1)


def close(actual, eager, ref, name):
    """conftest's rule, after checking the premise that eager's NaNs are the reference's.

    In fp32 they must be.  In bf16/fp16 eager may also overflow where the fp32 sum of the
    reference (and the op) does not; the op must then follow the reference (conftest checks
    the NaN pattern against it, and eager's error only where eager has one)."""
    nan_e, nan_r = torch.isnan(eager), torch.isnan(ref)
    if eager.dtype == torch.float32:
        assert torch.equal(nan_e, nan_r), f"{name}: eager's NaN pattern is not the reference's"
    else:
        assert not (nan_r & ~nan_e).any(), f"{name}: the reference is NaN where eager is finite"
    assert_close_to_reference(actual, eager, ref, name=name)


def leaves_of(vals: dict, dtype) -> dict:
    return {n: t.detach().to(dtype if t.dtype != torch.bool else t.dtype).requires_grad_() for n, t in vals.items()}


def check_case(case: Case, dtype: torch.dtype, device: str = "cpu", seed: int = 11):
    B, Hq, M, N, D = case.B, case.Hkv * case.G, case.M, case.N, case.D
    vals = {
        "q": torch.randn(B, Hq, M, D, dtype=torch.float64).to(dtype),
        "k": torch.randn(B, case.Hkv, N, D, dtype=torch.float64).to(dtype),
        "v": torch.randn(B, case.Hkv, N, D, dtype=torch.float64).to(dtype),
    }
    for n, kind in enumerate(case.biases):
        vals[f"bias{n}"] = make_bias(kind, case, dtype)
    masks = make_mask(case.mask, case)
    fill = fill_of(case, dtype)

    def run(kind):
        if kind == "op":
            lv = {n: t.detach().to(device).requires_grad_() for n, t in vals.items()}
            biases = [lv[n] for n in lv if n.startswith("bias")]
            out, lse = torch.ops.fusepass.attention(
                lv["q"], lv["k"], lv["v"], biases, [m.to(device) for m in masks],
                torch.tensor(seed, dtype=torch.int64), D**-0.5, case.softcap, case.dropout_p, fill,
                case.expr, [])
        else:
            lv = leaves_of(vals, dtype if kind == "eager" else torch.float64)
            biases = [lv[n] for n in lv if n.startswith("bias")]
            out, lse = dense(lv["q"], lv["k"], lv["v"], biases, masks, case, fill, seed,
                             fp32_scores=kind == "reference")
        return lv, out, lse

    lv, out, lse = run("op")
    lv_e, eager, eager_lse = run("eager")
    lv_r, ref, ref_lse = run("reference")
    assert out.dtype == dtype
    close(out.cpu(), eager, ref, "out")
    # lse: logsumexp of the scores, fp32; -inf exactly where eager's is.
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(eager_lse))
    fin = torch.isfinite(ref_lse)
    close(lse.cpu()[fin], eager_lse[fin], ref_lse[fin], "lse")

    grad_out = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
    names = list(lv)
    g = torch.autograd.grad(out, [lv[n] for n in names], grad_out.to(device))
    g_e = torch.autograd.grad(eager, [lv_e[n] for n in names], grad_out)
    g_r = torch.autograd.grad(ref, [lv_r[n] for n in names], grad_out.double())
    for n, a, e, r in zip(names, g, g_e, g_r):
        assert a.shape == r.shape and a.dtype == lv[n].dtype, n
        close(a.cpu(), e, r, f"d{n}")


CASES = [
    # 1. finfo.min as a bias (transformers on a left-padded batch)
    Case("llama_min_bias", biases=("llama",)),
    Case("leftpad_min_bias_causal_pred", biases=("leftpad",), expr=CAUSAL),
    Case("leftpad_min_bias_causal_pred_min_fill", biases=("leftpad",), expr=CAUSAL, fill="min", G=2, Hkv=1),
    Case("leftpad_min_bias_causal_pred_min_fill_dropout", biases=("leftpad",), expr=CAUSAL, fill="min",
         dropout_p=0.25),
    Case("llama_min_bias_softcap_dropout", biases=("llama",), softcap=5.0, dropout_p=0.2),
    Case("two_min_biases", biases=("min_a", "min_b")),
    Case("two_min_biases_masked_min_fill", biases=("min_a", "min_b"), mask="deadrows", fill="min"),
    # 2. BERT's -1e9 padding bias with a fully padded batch element
    Case("bert_1e9_bias", biases=("bert",)),
    Case("bert_1e9_bias_gqa_noise", biases=("bert", "noise"), G=2, Hkv=1, M=33, N=40),
    # 3. bool mask / predicate with -inf fill leaving rows with no visible key
    Case("mask_dead_rows_neginf", mask="deadrows"),
    Case("mask_dead_tile_neginf_gqa", mask="lastrows", G=2, Hkv=1, M=70),
    Case("predicate_dead_rows_neginf", expr=CAUSAL, M=70, N=20),
    Case("mask_dead_rows_neginf_with_bias", mask="deadrows", biases=("noise",)),
    Case("mask_dead_rows_min_fill_with_bias", mask="lastrows", biases=("noise",), fill="min", M=70),
]

DTYPES = [torch.float32, torch.bfloat16]


def _probe(case, dtype, device):
    """A call of the case's head dim and dtype: where would the op run it?"""
    t = torch.empty(1, 1, 1, case.D, dtype=dtype, device=device)
    return forward_call(t, t, t, [], [], None, 1.0, 0.0, 0.0, -math.inf, "", [])


@pytest.fixture
def small_tiles(monkeypatch):
    """The reference in tiles of 8 queries x 16 keys, so that small shapes cross tiles."""
    monkeypatch.setattr(reference, "BLOCK_M", 8)
    monkeypatch.setattr(reference, "BLOCK_N", 16)
    monkeypatch.setattr(reference, "MIN_BLOCK_M", 1)


@pytest.fixture
def kernels(monkeypatch, tmp_path_factory):
    """The op runs the Triton kernels (interpreted on CPU), with poisoned outputs."""
    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusepass-cache"))
    monkeypatch.setattr(launch_common, "poison_outputs", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reference(case, dtype, small_tiles, monkeypatch):
    monkeypatch.setenv("FUSEPASS_INTERPRET", "0")
    assert kernel_reason(_probe(case, dtype, "cpu"))
    check_case(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernels(case, dtype, kernels):
    assert kernel_reason(_probe(case, dtype, "cpu")) is None
    check_case(case, dtype)


GPU_CASES = CASES + [
    Case("llama_min_bias_large", B=3, Hkv=4, G=2, M=300, N=300, D=64, biases=("llama",)),
    Case("leftpad_min_bias_causal_pred_min_fill_large", B=3, Hkv=2, G=2, M=257, N=300, D=128,
         biases=("leftpad",), expr=CAUSAL, fill="min"),
    Case("bert_1e9_bias_large", B=2, Hkv=4, M=384, N=384, D=64, biases=("bert",)),
    Case("mask_dead_tile_neginf_large", B=2, Hkv=2, G=2, M=300, N=200, D=64, mask="lastrows"),
]


# fp16 too, except with two finfo.min biases: fp16 eager sums them to -inf in fp16 where the op
# (and fp32 / bf16 eager) keeps -131008, so a row they both hide entirely is NaN only in eager.
GPU_PARAMS = [pytest.param(c, dt, id=f"{c.name}-{name}") for c in GPU_CASES
              for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))
              if not (dt == torch.float16 and "min_a" in c.biases)]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", GPU_PARAMS)
def test_gpu_kernels(case, dtype):
    assert kernel_reason(_probe(case, dtype, "cuda")) is None
    check_case(case, dtype, device="cuda")
