"""The PyTorch reference behind ``torch.ops.fusepass.attention``, against a dense float64 formula.

Every comparison follows conftest's rule: the op's error against float64 may be at most a small
factor of eager's own error in the same dtype.  Most tests shrink the tile sizes so that small
shapes still cross several query and key tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import fusepass.ops.attention  # noqa: F401  (registers torch.ops.fusepass.*)
from conftest import assert_close_to_reference
from fusepass.masks.predicate import dense_keep
from fusepass.ops import reference
from fusepass.ops.attention import fused_attention
from fusepass.ops.dropout import keep_mask

CAUSAL = "j <= i + (N - M)"
SLIDING = "(j <= i + (N - M)) & (i + (N - M) - j < a0)"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 queries x 16 keys: a 17 x 33 problem spans 3 x 3 tiles."""
    monkeypatch.setattr(reference, "BLOCK_M", 8)
    monkeypatch.setattr(reference, "BLOCK_N", 16)
    monkeypatch.setattr(reference, "MIN_BLOCK_M", 1)


def dense_attention(q, k, v, *, biases=(), masks=(), scale=None, softcap=0.0, mask_fill=float("-inf"),
                    mask_expr="", mask_args=(), dropout_p=0.0, seed=0):
    """attention.py's formula, densely, in q's dtype; returns (out, lse).  Float64 inputs give the reference."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    k = k.repeat_interleave(G, dim=1)  # [B, Hq, N, D]
    v = v.repeat_interleave(G, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale  # [B, Hq, M, N]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    for b in biases:
        s = s + b.to(s.dtype)
    keep = torch.ones(B, Hq, M, N, dtype=torch.bool)
    for m in masks:
        keep = keep & m
    if mask_expr:
        keep = keep & dense_keep(mask_expr, B, Hq, M, N, mask_args)
    s = s.masked_fill(~keep, mask_fill)
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        rows = torch.arange(B * Hq * M).view(B, Hq, M, 1)
        z = keep_mask(seed, rows, torch.arange(N).view(1, N), dropout_p)
        p = p * z / (1 - dropout_p)
    return p @ v, torch.logsumexp(s.detach(), dim=-1)


@dataclass(frozen=True)
class Case:
    name: str
    B: int = 2
    Hkv: int = 2
    G: int = 1
    M: int = 17
    N: int = 17
    D: int = 16
    Dv: int | None = None
    biases: tuple[str, ...] = ()  # kinds, see make_inputs
    masks: tuple[str, ...] = ()
    expr: str = ""
    args: tuple[int, ...] = ()
    softcap: float = 0.0
    fill: float | str = float("-inf")  # "min" = finfo(dtype).min, as eager models use
    noncontig: bool = False  # q, k, v as transposes of [B, N, H, D]
    dropout_p: float = 0.0


@dataclass
class Inputs:
    """Leaves (what gradients are compared on) and the tensors handed to the op."""

    leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    q: torch.Tensor = None
    k: torch.Tensor = None
    v: torch.Tensor = None
    biases: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)


def make_values(case: Case, dtype: torch.dtype) -> dict:
    """Random values, already rounded to the dtype they are fed in, plus the bool masks."""
    B, Hkv, G, M, N, D = case.B, case.Hkv, case.G, case.M, case.N, case.D
    Hq, Dv = Hkv * G, case.Dv or case.D
    vals = {}
    for name, H, L, E in (("q", Hq, M, D), ("k", Hkv, N, D), ("v", Hkv, N, Dv)):
        shape = (B, L, H, E) if case.noncontig else (B, H, L, E)
        vals[name] = torch.randn(shape, dtype=torch.float64).to(dtype)
    bias_shapes = {"b11n": (B, 1, 1, N), "b1mn": (B, 1, M, N), "hmn": (1, Hq, M, N), "expanded": (N,),
                   "b1mn_bf16": (B, 1, M, N)}
    for n, kind in enumerate(case.biases):
        bdt = torch.bfloat16 if kind.endswith("_bf16") else dtype
        vals[f"bias{n}"] = torch.randn(bias_shapes[kind], dtype=torch.float64).to(bdt)
    masks = []
    for kind in case.masks:
        if kind == "pad":  # batch b sees its first N - b * N // 3 keys (at least one)
            lengths = torch.tensor([max(1, N - b * (N // 3)) for b in range(B)])
            masks.append((torch.arange(N) < lengths.view(B, 1)).view(B, 1, 1, N))
        elif kind == "rand":
            masks.append(torch.rand(1, 1, M, N) < 0.7)
        elif kind == "full":
            masks.append(torch.rand(B, Hq, M, N) < 0.8)
        elif kind == "deadrows":  # every third query row sees nothing
            masks.append((torch.arange(M) % 3 != 0).view(1, 1, M, 1).expand(B, 1, M, 1))
        else:
            raise AssertionError(kind)
    vals["masks"] = masks
    return vals


def as_inputs(case: Case, vals: dict, dtype: torch.dtype) -> Inputs:
    """Fresh leaves holding ``vals`` in ``dtype`` (float64 for the reference) and the op's views of them."""
    B, Hq, M, N = case.B, case.Hkv * case.G, case.M, case.N
    inp = Inputs()
    for name in ("q", "k", "v"):
        leaf = vals[name].to(dtype).requires_grad_()
        inp.leaves[name] = leaf
        setattr(inp, name, leaf.transpose(1, 2) if case.noncontig else leaf)
    for n, kind in enumerate(case.biases):
        bdt = vals[f"bias{n}"].dtype if dtype != torch.float64 else torch.float64
        leaf = vals[f"bias{n}"].to(bdt).requires_grad_()
        inp.leaves[f"bias{n}"] = leaf
        inp.biases.append(leaf.expand(B, Hq, M, N) if kind == "expanded" else leaf)
    inp.masks = list(vals["masks"])
    return inp


def fill_value(case: Case, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min if case.fill == "min" else float(case.fill)


def run_op(inp: Inputs, case: Case, fill: float, seed: int = 0):
    return torch.ops.fusepass.attention(
        inp.q, inp.k, inp.v, inp.biases, inp.masks, torch.tensor(seed, dtype=torch.int64),
        case.D**-0.5, case.softcap, case.dropout_p, fill, case.expr, list(case.args),
    )


def run_dense(inp: Inputs, case: Case, fill: float, seed: int = 0):
    return dense_attention(
        inp.q, inp.k, inp.v, biases=inp.biases, masks=inp.masks, softcap=case.softcap, mask_fill=fill,
        mask_expr=case.expr, mask_args=case.args, dropout_p=case.dropout_p, seed=seed,
    )


def grads(out: torch.Tensor, inp: Inputs, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    names = list(inp.leaves)
    gs = torch.autograd.grad(out, [inp.leaves[n] for n in names], grad_out.to(out.dtype))
    return dict(zip(names, gs))


def assert_lse_close(lse, eager_lse, ref_lse):
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf pattern differs"
    finite = torch.isfinite(ref_lse)
    assert_close_to_reference(lse[finite], eager_lse[finite].float(), ref_lse[finite], name="lse")


def check_against_reference(case: Case, dtype: torch.dtype, seed: int = 0):
    vals = make_values(case, dtype)
    fill = fill_value(case, dtype)
    fused, eager, ref = (as_inputs(case, vals, dt) for dt in (dtype, dtype, torch.float64))
    out, lse = run_op(fused, case, fill, seed)
    eager_out, eager_lse = run_dense(eager, case, fill, seed)
    ref_out, ref_lse = run_dense(ref, case, fill, seed)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close_to_reference(out, eager_out, ref_out, name="out")
    assert_lse_close(lse, eager_lse, ref_lse)
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64).to(dtype)
    g_fused, g_eager, g_ref = grads(out, fused, grad_out), grads(eager_out, eager, grad_out), grads(ref_out, ref, grad_out)
    for name in g_ref:
        assert g_fused[name].dtype == fused.leaves[name].dtype
        assert g_fused[name].shape == fused.leaves[name].shape
        assert_close_to_reference(g_fused[name], g_eager[name], g_ref[name], name=f"d{name}")


CASES = [
    Case("plain"),
    Case("gqa2", G=2),
    Case("gqa4", Hkv=1, G=4),
    Case("m1_n129_d40", M=1, N=129, D=40),
    Case("m129_n1_d80", M=129, N=1, D=80),
    Case("m17_n129_d96_gqa2", M=17, N=129, D=96, G=2),
    Case("dv_ne_d", D=40, Dv=16, G=2, N=33),
    Case("bias_b11n", biases=("b11n",)),
    Case("bias_b1mn", biases=("b1mn",), G=2, N=33),
    Case("bias_hmn", biases=("hmn",), G=2, N=33),
    Case("bias_several_expanded", biases=("b11n", "hmn", "expanded"), G=2, N=33),
    Case("bias_bf16_dtype", biases=("b1mn_bf16",)),
    Case("mask_pad", masks=("pad",), N=33),
    Case("mask_rand_full", masks=("rand", "full"), G=2, N=33),
    Case("causal", expr=CAUSAL, M=17, N=33, G=2),
    Case("causal_m_gt_n_neginf", expr=CAUSAL, M=33, N=17),  # the first rows see nothing: NaN
    Case("causal_m_gt_n_min", expr=CAUSAL, M=33, N=17, fill="min", biases=("b1mn",)),  # uniform rows
    Case("sliding_window", expr=SLIDING, args=(5,), M=33, N=33, G=2),
    Case("softcap", softcap=1.5, biases=("b11n",), N=33),
    Case("dead_rows_neginf", masks=("deadrows",), biases=("b11n",), N=33, G=2),
    Case("dead_rows_min", masks=("deadrows", "rand"), biases=("b1mn",), fill="min", N=33),
    Case("dead_rows_fill_1e4", masks=("deadrows",), fill=-1e4, N=33),
    Case("noncontig", noncontig=True, G=2, D=40, N=33),
    Case("everything", G=2, M=33, N=129, D=40, Dv=24, biases=("b11n", "hmn"), masks=("pad",), expr=SLIDING,
         args=(9,), softcap=3.0, fill="min", noncontig=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_dense_formula(case, dtype, small_tiles):
    check_against_reference(case, dtype)


@pytest.mark.parametrize("case", [CASES[5], CASES[-1]], ids=["gqa2_odd", "everything"])
def test_default_tiles(case):
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_matches_dense_formula_with_same_mask(dtype, small_tiles):
    case = Case("dropout", G=2, M=17, N=33, D=40, biases=("b1mn",), expr=CAUSAL, dropout_p=0.3)
    check_against_reference(case, dtype, seed=1234)


def test_float64_is_computed_in_float64(small_tiles):
    """fp64 inputs: output and gradients agree with the dense formula to fp64 precision,
    also with finite fill on fully masked rows (the backward recomputes row statistics there)."""
    case = Case("fp64", G=2, M=17, N=33, D=16, biases=("hmn",), masks=("deadrows",), expr=CAUSAL,
                softcap=2.0, fill="min", dropout_p=0.25)
    vals = make_values(case, torch.float64)
    fill = fill_value(case, torch.float32)
    fused, ref = as_inputs(case, vals, torch.float64), as_inputs(case, vals, torch.float64)
    out, _ = run_op(fused, case, fill, seed=7)
    ref_out, _ = run_dense(ref, case, fill, seed=7)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(ref_out)
    g_fused, g_ref = grads(out, fused, grad_out), grads(ref_out, ref, grad_out)
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-9, atol=1e-11, msg=f"d{name}")


def test_gradcheck_with_dropout_softcap_bias(small_tiles):
    """Analytic gradients against finite differences; the fixed seed makes dropout a fixed function."""
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(99, dtype=torch.int64)

    def f(q, k, v, bias):
        return fused_attention(q, k, v, biases=[bias], softcap=1.0, dropout_p=0.3, seed=seed,
                               mask_expr=SLIDING, mask_args=[4])

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_dropout_same_seed_same_output():
    q, k, v = torch.randn(2, 4, 17, 16), torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16)
    s1, s2 = torch.tensor(5, dtype=torch.int64), torch.tensor(6, dtype=torch.int64)
    a = fused_attention(q, k, v, dropout_p=0.5, seed=s1)
    b = fused_attention(q, k, v, dropout_p=0.5, seed=s1)
    c = fused_attention(q, k, v, dropout_p=0.5, seed=s2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, fused_attention(q, k, v))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_mask_and_rate(p, small_tiles):
    """With uniform attention and V = identity the output spells out the keep mask itself:
    out[b, h, i, j] = keep[b, h, i, j] / (N (1 - p)).  It must be keep_mask's, row (b*Hq+h)*M+i."""
    B, Hq, Hkv, M, N = 2, 4, 2, 24, 40
    q = torch.zeros(B, Hq, M, 8, dtype=torch.float64)
    k = torch.zeros(B, Hkv, N, 8, dtype=torch.float64)
    v = torch.eye(N, dtype=torch.float64).expand(B, Hkv, N, N)
    seed = torch.tensor(31337, dtype=torch.int64)
    out = fused_attention(q, k, v, dropout_p=p, seed=seed)
    kept = out * N * (1 - p)
    assert torch.allclose(kept, kept.round(), atol=1e-9)
    rows = torch.arange(B * Hq * M).view(B, Hq, M, 1)
    expected = keep_mask(int(seed), rows, torch.arange(N).view(1, N), p)
    assert torch.equal(kept.round().bool(), expected)
    n = kept.numel()
    rate = kept.sum().item() / n
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.4f}, expected {1 - p}"


def test_lse_and_fully_masked_rows():
    """lse = logsumexp of the masked scores: -inf for rows with nothing visible under -inf fill,
    and the output there is NaN as in eager; with a finite fill such a row averages all of V."""
    B, H, M, N = 1, 2, 6, 9
    q, k, v = torch.randn(B, H, M, 8), torch.randn(B, H, N, 8), torch.randn(B, H, N, 5)
    mask = (torch.arange(M) % 2 == 1).view(1, 1, M, 1).expand(B, 1, M, N)
    seed = torch.tensor(0, dtype=torch.int64)
    out, lse = torch.ops.fusepass.attention(q, k, v, [], [mask], seed, 0.3, 0.0, 0.0, float("-inf"), "", [])
    assert torch.isneginf(lse[:, :, ::2]).all() and torch.isfinite(lse[:, :, 1::2]).all()
    assert torch.isnan(out[:, :, ::2]).all() and not torch.isnan(out[:, :, 1::2]).any()
    fill = torch.finfo(torch.float32).min
    out, lse = torch.ops.fusepass.attention(q, k, v, [], [mask], seed, 0.3, 0.0, 0.0, fill, "", [])
    torch.testing.assert_close(out[:, :, ::2], v.mean(dim=2, keepdim=True).expand(B, H, M // 2, 5))
    ref_lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2) * 0.3), dim=-1)
    torch.testing.assert_close(lse[:, :, 1::2], ref_lse[:, :, 1::2].float())


def test_backward_honors_a_global_lse(small_tiles):
    """Ring attention: the backward of one key shard, given the output and lse over all keys,
    yields that shard's share of the full gradients (dq is the sum over shards)."""
    B, Hq, Hkv, M, N, D = 1, 4, 2, 17, 40, 16
    q, k, v = torch.randn(B, Hq, M, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    seed = torch.tensor(0, dtype=torch.int64)
    scale = D**-0.5
    out, lse = torch.ops.fusepass.attention(q, k, v, [], [], seed, scale, 0.0, 0.0, float("-inf"), "", [])
    grad_out = torch.randn_like(out)
    split = 23
    parts = []
    for sl in (slice(0, split), slice(split, N)):
        parts.append(torch.ops.fusepass.attention_backward(
            grad_out, q, k[:, :, sl], v[:, :, sl], out, lse, [], [], seed, scale, 0.0, 0.0,
            float("-inf"), "", [], [],
        ))
    qs, ks, vs = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, _ = dense_attention(qs, ks, vs, scale=scale)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(ref_out, (qs, ks, vs), grad_out.double())
    qe, ke, ve = (t.clone().requires_grad_() for t in (q, k, v))
    eager_out, _ = dense_attention(qe, ke, ve, scale=scale)
    dq_e, dk_e, dv_e = torch.autograd.grad(eager_out, (qe, ke, ve), grad_out)
    assert_close_to_reference(parts[0][0] + parts[1][0], dq_e, dq_ref, name="dq")
    assert_close_to_reference(torch.cat([parts[0][1], parts[1][1]], dim=2), dk_e, dk_ref, name="dk")
    assert_close_to_reference(torch.cat([parts[0][2], parts[1][2]], dim=2), dv_e, dv_ref, name="dv")


def test_tiles_bound_the_score_buffer(monkeypatch):
    """No buffer of M x N scores: every tile is at most BLOCK_M x BLOCK_N per head, and at most
    MAX_TILE_SCORES in all (bm shrinks when B * Hq is large)."""
    monkeypatch.setattr(reference, "BLOCK_M", 16)
    monkeypatch.setattr(reference, "BLOCK_N", 32)
    monkeypatch.setattr(reference, "MIN_BLOCK_M", 2)
    monkeypatch.setattr(reference, "MAX_TILE_SCORES", 4096)
    shapes = []
    original = reference._Problem.scores

    def spy(self, qt, keep, i0, i1, j0, j1):
        s, *rest = original(self, qt, keep, i0, i1, j0, j1)
        shapes.append(tuple(s.shape))
        return (s, *rest)

    monkeypatch.setattr(reference._Problem, "scores", spy)
    B, Hkv, G, M, N = 2, 2, 2, 50, 70
    q = torch.randn(B, Hkv * G, M, 16, requires_grad=True)
    k, v = torch.randn(B, Hkv, N, 16), torch.randn(B, Hkv, N, 16)
    fused_attention(q, k, v, mask_expr=CAUSAL).sum().backward()
    assert len(shapes) > 1
    for shape in shapes:
        assert shape[:3] == (B, Hkv, G)
        assert shape[3] <= 16 and shape[4] <= 32
        assert math.prod(shape) <= 4096
    assert max(s[3] for s in shapes) == 4096 // (B * Hkv * G * 32)  # 16 would exceed the budget


OPCHECK_CASES = {
    "gqa_bias_mask_predicate_softcap": dict(
        shapes=(2, 4, 2, 9, 11, 8, 8), bias=True, mask=True, expr=SLIDING, args=[3], softcap=2.0,
        dropout_p=0.0, fill=float("-inf")),
    "dropout_finite_fill": dict(
        shapes=(1, 2, 2, 5, 7, 8, 4), bias=False, mask=True, expr="", args=[], softcap=0.0,
        dropout_p=0.2, fill=torch.finfo(torch.float32).min),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name, small_tiles):
    c = OPCHECK_CASES[name]
    B, Hq, Hkv, M, N, D, Dv = c["shapes"]
    q = torch.randn(B, Hq, M, D, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, requires_grad=True)
    v = torch.randn(B, Hkv, N, Dv, requires_grad=True)
    biases = [torch.randn(B, 1, M, N, requires_grad=True)] if c["bias"] else []
    masks = [torch.rand(1, 1, M, N) < 0.8] if c["mask"] else []
    seed = torch.tensor(3, dtype=torch.int64)
    args = (q, k, v, biases, masks, seed, D**-0.5, c["softcap"], c["dropout_p"], c["fill"], c["expr"], c["args"])
    torch.library.opcheck(torch.ops.fusepass.attention.default, args)


def _qkv():
    return torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, v: (q[0], k, v, {}), "must be 4-D"),
        (lambda q, k, v: (q, k, v[:, :, :4], {}), "disagree on"),
        (lambda q, k, v: (torch.randn(1, 3, 4, 8), k, v, {}), "not a multiple"),
        (lambda q, k, v: (q, k.double(), v, {}), "dtypes differ"),
        (lambda q, k, v: (q.long(), k.long(), v.long(), {}), "not a floating dtype"),
        (lambda q, k, v: (q, k, v, dict(biases=[torch.randn(1, 2, 3, 5)])), "does not broadcast"),
        (lambda q, k, v: (q, k, v, dict(biases=[torch.ones(5, dtype=torch.int32)])), "floating point"),
        (lambda q, k, v: (q, k, v, dict(masks=[torch.ones(1, 1, 4, 5)])), "must be bool"),
        (lambda q, k, v: (q, k, v, dict(mask_expr="i.real > 0")), "not allowed"),
        (lambda q, k, v: (q, k, v, dict(mask_expr="j <= (i")), "not an expression"),
        (lambda q, k, v: (q, k, v, dict(mask_expr="j - i")), "not bool"),
        (lambda q, k, v: (q, k, v, dict(mask_expr="j < i + a1", mask_args=[1])), "uses 2 mask_args"),
        (lambda q, k, v: (q, k, v, dict(dropout_p=1.0)), r"dropout_p must be in \[0, 1\)"),
        (lambda q, k, v: (q, k, v, dict(dropout_p=0.5, seed=None)), "needs a seed"),
        (lambda q, k, v: (q, k, v, dict(softcap=-1.0)), "softcap must be"),
        (lambda q, k, v: (q, k, v, dict(softcap=float("nan"))), "softcap must be"),
        (lambda q, k, v: (q, k, v, dict(scale=float("inf"))), "scale must be finite"),
    ],
    ids=["not_4d", "kv_mismatch", "heads", "dtype_mix", "int_dtype", "bias_shape", "bias_dtype",
         "mask_dtype", "predicate_attr", "predicate_syntax", "predicate_not_bool", "predicate_args", "dropout_1",
         "dropout_no_seed", "softcap_negative", "softcap_nan", "scale_inf"],
)
@pytest.mark.parametrize("path", ["reference", "interpreter"])
def test_invalid_inputs_raise_value_error(make, match, path, monkeypatch):
    """Bad input is refused with one clear error, whichever implementation would run."""
    if path == "interpreter":
        monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    q, k, v, kwargs = make(*_qkv())
    if "seed" in kwargs:  # fused_attention draws a seed itself; call the op as the backend does
        args = (q, k, v, [], [], None, 8 ** -0.5, 0.0, kwargs["dropout_p"], float("-inf"), "", [])
        with pytest.raises(ValueError, match=match):
            torch.ops.fusepass.attention(*args)
        return
    with pytest.raises(ValueError, match=match):
        fused_attention(q, k, v, **kwargs)


from kernel_cases import EMPTY_SHAPES  # noqa: E402
from fusepass.ops.dispatch import backward_call, forward_call


def _check_empty(shape, device, dtype):
    """Empty problems get eager's values: no rows or heads give empty outputs; no keys give
    out = 0 (a sum over no keys), lse = -inf and zero gradients.  The fake agrees on shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, Hq, Hkv, M, N = shape
    q = torch.randn(B, Hq, M, 16, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, N, 16, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, N, 8, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(B, 1, M, N, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(1, 1, 1, N, dtype=torch.bool, device=device)
    seed = torch.tensor(3, dtype=torch.int64)
    args = ([bias], [mask], seed, 0.25, 0.0, 0.0, float("-inf"), CAUSAL, [])
    out, lse = torch.ops.fusepass.attention(q, k, v, *args)
    # Eager: what a model computes.
    G = Hq // Hkv if Hkv else 1
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * 0.25 + bias
    s = s.masked_fill(~(mask & dense_keep(CAUSAL, B, Hq, M, N, [], device=device)), float("-inf"))
    want = torch.softmax(s, -1) @ v.repeat_interleave(G, 1)
    assert out.shape == want.shape and torch.equal(out, want)
    assert lse.shape == (B, Hq, M) and lse.dtype == torch.float32 and torch.equal(lse, torch.logsumexp(s, -1).float())
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
    want_grads = torch.autograd.grad(want, (q, k, v, bias), torch.ones_like(want), allow_unused=True)
    for name, g, w, t in zip(("dq", "dk", "dv", "dbias"), grads, want_grads, (q, k, v, bias)):
        w = torch.zeros_like(t) if w is None else w
        assert g.shape == t.shape and torch.equal(g, w), name
    with FakeTensorMode() as mode:
        fq, fk, fv, fb = (mode.from_tensor(t) for t in (q, k, v, bias))
        fout, flse = torch.ops.fusepass.attention(fq, fk, fv, [fb], [mode.from_tensor(mask)], mode.from_tensor(seed),
                                                  *args[3:])
    assert fout.shape == out.shape and flse.shape == lse.shape


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "B%d_Hq%d_Hkv%d_M%d_N%d" % s)
def test_empty_problems(shape, monkeypatch):
    monkeypatch.setenv("FUSEPASS_INTERPRET", "0")
    _check_empty(shape, "cpu", torch.float32)
    # The reference's functions themselves, called directly.
    B, Hq, Hkv, M, N = shape
    q, k, v = torch.randn(B, Hq, M, 16), torch.randn(B, Hkv, N, 16), torch.randn(B, Hkv, N, 8)
    feats = (None, 0.25, 0.0, 0.0, float("-inf"), "", [])
    out, lse = reference.attention_forward(forward_call(q, k, v, [], [], *feats))
    assert torch.equal(out, torch.zeros(B, Hq, M, 8)) and torch.equal(lse, torch.full((B, Hq, M), -math.inf))
    for g, t in zip(reference.attention_backward(backward_call(torch.ones_like(out), q, k, v, out, lse, [], [], *feats, []))[:3],
                    (q, k, v)):
        assert torch.equal(g, torch.zeros_like(t))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "B%d_Hq%d_Hkv%d_M%d_N%d" % s)
def test_empty_problems_gpu_reference(shape):
    _check_empty(shape, "cuda", torch.float64)  # float64: the kernels do not serve it
