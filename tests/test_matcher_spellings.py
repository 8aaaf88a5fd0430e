"""The matcher finds attention however it is spelled (issue 2, "The matcher").

Every test builds an ordinary attention function from plain-Python spellings (one dict entry per
spelling: contraction, K transpose, scale, softmax, masks and biases, GQA, softcap, dropout), then
checks four things:

* ``counters["fusepass"]["attention_fused"]`` equals the number of sites, nothing was rejected;
* the compiled forward and the gradients of q, k, v and of every bias that requires grad are as
  close to a float64 reference as eager is (conftest's rule; the reference is the same function
  run on float64 copies of the inputs);
* ``fusepass.explain`` reports the site with what was written (scale, mask, bias, GQA, softcap,
  dropout, layout) at the softmax's line in this file;
* for GQA, the op is handed the un-repeated K and V.

Shapes are tiny on purpose (the whole file runs on CPU in CI).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fusepass
from fusepass.ops.attention import FORWARD_OPS
from attention_programs import MATMULS  # the spellings of a batched product, shared with the fuzzer
from conftest import assert_close_to_reference
from e2e_util import fresh_leaves

OPTS = {"inner": "aot_eager"}
THIS_FILE = os.path.basename(__file__)

# NOTE: M == N so that a causal tril applies; N != D so that a K with swapped axes is not
# silently legal; H != HKV for GQA.
B, H, HKV, M, N, D = 2, 4, 2, 12, 12, 8
SCALE = D**-0.5
SQRT_D = math.sqrt(D)
SOFTCAP = 5.0
P_DROP = 0.25
TRIL = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)  # nanoGPT's causal buffer, longer than M
DTYPES = [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------- spellings, as plain Python
def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, N, D] -> [B, Hkv * n_rep, N, D] by expand + reshape."""
    batch, num_key_value_heads, slen, head_dim = hidden.shape
    if n_rep == 1:
        return hidden
    hidden = hidden[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


GQA = {
    "repeat_kv": repeat_kv,
    # The same with the new axis indexed short and sizes left to expand (-1) and to q's shape.
    "repeat_kv short": lambda x, g: x[:, :, None].expand(-1, -1, g, -1, -1).reshape(
        x.shape[0], x.shape[1] * g, x.shape[2], x.shape[3]),
    "repeat_kv ellipsis": lambda x, g: x[:, :, None, ...].expand(-1, -1, g, -1, -1).flatten(1, 2),
    "repeat_interleave": lambda x, g: x.repeat_interleave(g, dim=1),
}

# How K becomes [.., D, N] for q @ kt, and the layout its input is stored in.
K_FORMS = {
    "transpose": lambda k: k.transpose(-2, -1),
    "mT": lambda k: k.mT,
    "permute": lambda k: k.permute(0, 1, 3, 2) if k.dim() == 4 else k.permute(0, 2, 1),
    "stored [D, N]": lambda k: k,
    "permute [B, N, H, D]": lambda k: k.permute(0, 2, 3, 1),
}
K_LAYOUT = {"stored [D, N]": "bhdn", "permute [B, N, H, D]": "bnhd"}

BADDBMMS = ("baddbmm beta=0 empty", "baddbmm beta=0 nan buffer", "baddbmm beta=1 bias")

# einsum spellings of Q·Kᵀ: equation, layouts of (q, k).
EINSUM_QK = {
    "einsum bhqd,bhkd": ("bhqd,bhkd->bhqk", "bhnd", "bhnd"),
    "einsum K as [D, N]": ("bhqd,bhdk->bhqk", "bhnd", "bhdn"),
    "einsum ellipsis": ("...id,...jd->...ij", "bhnd", "bhnd"),
    "einsum bqhd,bkhd": ("bqhd,bkhd->bhqk", "bnhd", "bnhd"),
    "einsum 3-D": ("zid,zjd->zij", "bhnd", "bhnd"),
}
# einsum spellings of P·V: equation, layout of v.
EINSUM_PV = {
    "einsum bhqk,bhkd": ("bhqk,bhkd->bhqd", "bhnd"),
    "einsum ellipsis": ("...ij,...jd->...id", "bhnd"),
    "einsum bhqk,bkhd": ("bhqk,bkhd->bhqd", "bnhd"),
    "einsum 3-D": ("zij,zjd->zid", "bhnd"),
}

# Scale on the scores (the q/k/alpha spellings are applied elsewhere and are identity here).
SCORE_SCALES = {
    "* s": lambda s: s * SCALE,
    "/ s": lambda s: s / SQRT_D,
    "/ math.sqrt(d)": lambda s: s / math.sqrt(D),
    "/ torch.full([], s)": lambda s: s / torch.full([], SQRT_D),
    "q * s": lambda s: s,
    "k * s": lambda s: s,
    "sqrt on q and k": lambda s: s,
    "baddbmm alpha": lambda s: s,
    "none": lambda s: s,
}

_NN_SOFTMAX = nn.Softmax(dim=-1)
# One line per spelling: a site's location is the line of its softmax.
SOFTMAXES = {
    "F.softmax": lambda s: F.softmax(s, dim=-1),
    "torch.softmax": lambda s: torch.softmax(s, -1),
    "Tensor.softmax": lambda s: s.softmax(dim=-1),
    "nn.Softmax": lambda s: _NN_SOFTMAX(s),
    "F.softmax positive dim": lambda s: F.softmax(s, dim=s.dim() - 1),
    "dtype=float32": lambda s: F.softmax(s, dim=-1, dtype=torch.float32).to(s.dtype),
    ".float() / type_as": lambda s: F.softmax(s.float(), dim=-1).type_as(s),
    ".to()": lambda s: torch.softmax(s.to(torch.float32), dim=-1).to(s.dtype),
    ".type()": lambda s: s.type(torch.float32).softmax(-1).type(s.dtype),
}

# Masks and biases, applied to the scores in the order listed; ``t`` holds the inputs.
MASKS = {
    "pad [B,1,1,N]": lambda s, t: s + t["pad"],
    "bias [B,1,M,N]": lambda s, t: s + t["bias_bmn"],
    "bias [1,H,M,N] grad": lambda s, t: s + t["pos_bias"],
    "masked_fill -inf": lambda s, t: s.masked_fill(t["hide"], float("-inf")),
    "masked_fill finfo.min": lambda s, t: s.masked_fill(t["hide"], torch.finfo(s.dtype).min),
    "where -inf": lambda s, t: torch.where(t["keep"], s, float("-inf")),
    "where finfo.min": lambda s, t: torch.where(t["keep"], s, torch.finfo(s.dtype).min),
    "tril == 0": lambda s, t: s.masked_fill(TRIL[:, :, : s.size(-2), : s.size(-1)] == 0, float("-inf")),
}
BIAS_INPUT = {"pad [B,1,1,N]": "pad", "bias [B,1,M,N]": "bias_bmn", "bias [1,H,M,N] grad": "pos_bias"}
FINITE_FILL = {"masked_fill finfo.min", "where finfo.min"}

_NN_DROPOUT_EVAL = nn.Dropout(P_DROP).eval()
_NN_DROPOUT_TRAIN = nn.Dropout(P_DROP).train()
DROPOUTS = {
    "F.dropout eval": lambda p: F.dropout(p, P_DROP, training=False),
    "nn.Dropout eval": lambda p: _NN_DROPOUT_EVAL(p),
    "torch.dropout eval": lambda p: torch.dropout(p, P_DROP, False),
    "F.dropout train": lambda p: F.dropout(p, P_DROP, training=True),
    "nn.Dropout train": lambda p: _NN_DROPOUT_TRAIN(p),
    "torch.dropout train": lambda p: torch.dropout(p, P_DROP, True),
}


@dataclasses.dataclass(frozen=True)
class Spelling:
    qk: str = "@"  # a MATMULS key, a BADDBMMS entry or an EINSUM_QK key
    pv: str = "@"  # a MATMULS key or an EINSUM_PV key
    rank: int = 4  # 4: [B, H, N, D]; 3: [B*H, N, D]
    k_form: str = "transpose"  # a K_FORMS key (ignored by einsum)
    scale: str = "* s"  # a SCORE_SCALES key
    softmax: str = "F.softmax"
    masks: tuple = ()  # MASKS keys, in order
    gqa: str = ""  # a GQA key, or "" for plain multi-head
    softcap: float = 0.0
    dropout: str = ""  # a DROPOUTS key, or ""

    def __str__(self) -> str:
        d = Spelling()
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != getattr(d, f.name)) or "default"

    @property
    def layouts(self) -> tuple[str, str, str]:
        """Storage layouts of the q, k, v inputs: "bhnd", "bhdn" (K as [.., D, N]) or "bnhd"."""
        if self.qk in EINSUM_QK:
            _, lq, lk = EINSUM_QK[self.qk]
        else:
            lq, lk = "bhnd", K_LAYOUT.get(self.k_form, "bhnd")
        lv = EINSUM_PV[self.pv][1] if self.pv in EINSUM_PV else "bhnd"
        return lq, lk, lv

    @property
    def heads_kv(self) -> int:
        return HKV if self.gqa else H

    @property
    def scale_value(self) -> float:
        return 1.0 if self.scale == "none" else SCALE


def build(sp: Spelling):
    """The attention function the spelling describes: t (a dict of inputs) -> output."""
    softmax = SOFTMAXES[sp.softmax]
    score_scale = SCORE_SCALES[sp.scale]
    groups = H // HKV

    def attention(t):
        q, k, v = t["q"], t["k"], t["v"]
        if sp.gqa:
            k, v = GQA[sp.gqa](k, groups), GQA[sp.gqa](v, groups)
        if sp.scale == "q * s":
            q = q * SCALE
        elif sp.scale == "k * s":
            k = k * SCALE
        elif sp.scale == "sqrt on q and k":
            q, k = q * SCALE**0.5, k * SCALE**0.5
        if sp.qk in EINSUM_QK:
            s = torch.einsum(EINSUM_QK[sp.qk][0], q, k)
        elif sp.qk in BADDBMMS:
            alpha = SCALE if sp.scale == "baddbmm alpha" else 1.0
            kt = K_FORMS[sp.k_form](k)
            if sp.qk == "baddbmm beta=0 empty":
                buf = torch.empty(q.size(0), q.size(1), kt.size(2), dtype=q.dtype, device=q.device)
                s = torch.baddbmm(buf, q, kt, beta=0.0, alpha=alpha)
            elif sp.qk == "baddbmm beta=0 nan buffer":
                s = torch.baddbmm(t["nan_buf"], q, kt, beta=0.0, alpha=alpha)
            else:
                s = torch.baddbmm(t["bmm_bias"], q, kt, beta=1.0, alpha=alpha)
        else:
            s = MATMULS[sp.qk](q, K_FORMS[sp.k_form](k))
        s = score_scale(s)
        if sp.softcap:
            s = torch.tanh(s / sp.softcap) * sp.softcap
        for name in sp.masks:
            s = MASKS[name](s, t)
        p = softmax(s)
        if sp.dropout:
            p = DROPOUTS[sp.dropout](p)
        if sp.pv in EINSUM_PV:
            return torch.einsum(EINSUM_PV[sp.pv][0], p, v)
        return MATMULS[sp.pv](p, v)

    return attention


# ---------------------------------------------------------------- inputs
def _store(x: torch.Tensor, layout: str, rank: int) -> torch.Tensor:
    """x [B, h, n, d] in the given storage layout and rank."""
    if layout == "bhdn":
        x = x.transpose(-2, -1)
    elif layout == "bnhd":
        x = x.permute(0, 2, 1, 3)
    x = x.contiguous()
    return x.reshape(-1, *x.shape[2:]) if rank == 3 else x


def _scores_shaped(x: torch.Tensor, rank: int) -> torch.Tensor:
    """A [b, h, M, N] mask/bias as the scores of that rank see it ([B*H, M, N] for 3-D)."""
    return x.expand(B, H, M, N).reshape(B * H, M, N).clone() if rank == 3 else x


def make_inputs(sp: Spelling, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    lq, lk, lv = sp.layouts
    hk = sp.heads_kv
    t = {
        "q": _store(torch.randn(B, H, M, D, generator=g), lq, sp.rank),
        "k": _store(torch.randn(B, hk, N, D, generator=g), lk, sp.rank),
        "v": _store(torch.randn(B, hk, N, D, generator=g), lv, sp.rank),
    }
    for name in ("q", "k", "v"):
        t[name] = t[name].to(dtype).requires_grad_()
    if sp.qk == "baddbmm beta=0 nan buffer":
        t["nan_buf"] = torch.full((B * H, M, N), float("nan"), dtype=dtype)  # poison: must never be read
    if sp.qk == "baddbmm beta=1 bias":
        t["bmm_bias"] = torch.randn(B * H, M, N, generator=g).to(dtype).requires_grad_()
    # Every row keeps key 0 and its own key: no row is fully masked.
    i, j = torch.arange(M).view(M, 1), torch.arange(N).view(1, N)
    keep = (torch.rand(B, 1, M, N, generator=g) > 0.3) | (j == 0) | (i == j)
    pad = torch.zeros(B, 1, 1, N)
    pad[1, ..., -3:] = torch.finfo(dtype).min  # batch 1 has 3 padded keys (never key 0)
    extras = {
        "keep": keep,
        "hide": ~keep,
        "pad": pad.to(dtype),
        "bias_bmn": torch.randn(B, 1, M, N, generator=g).to(dtype),
        "pos_bias": torch.randn(1, H, M, N, generator=g).to(dtype),
    }
    for name, x in extras.items():
        t[name] = _scores_shaped(x, sp.rank)
    t["pos_bias"].requires_grad_()
    return t


_copy = fresh_leaves


def projection(out: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    """A fixed random projection: a scalar loss with a non-degenerate gradient everywhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)


def _forward_backward(fn, t: dict):
    out = fn(t)
    (out * projection(out)).sum().backward()
    return out.detach(), {n: x.grad for n, x in t.items() if x.grad is not None}


# ---------------------------------------------------------------- checks
def expected_bias(sp: Spelling, t: dict) -> str:
    parts = []
    names = (["bmm_bias"] if sp.qk == "baddbmm beta=1 bias" else []) + [BIAS_INPUT[m] for m in sp.masks if m in BIAS_INPUT]
    for name in names:
        x = t[name]
        parts.append("[" + ",".join(str(s) for s in x.shape) + "]" + (" (grad)" if x.requires_grad else ""))
    return " + ".join(parts) or "none"


def check_site(site, sp: Spelling, dtype: torch.dtype, t: dict) -> None:
    assert site.fused, f"not fused: {site.reason}"
    assert site.reason is None
    line = SOFTMAXES[sp.softmax].__code__.co_firstlineno
    assert site.location == f"{THIS_FILE}:{line}"
    assert site.layout == ("[B, H, N, D]" if sp.rank == 4 else "[B*H, N, D]")
    assert site.dtype == str(dtype).replace("torch.", "")
    assert site.scale == pytest.approx(sp.scale_value, rel=1e-6)
    assert site.softcap == pytest.approx(sp.softcap)
    training = sp.dropout.endswith("train")
    assert site.dropout_p == pytest.approx(P_DROP if training else 0.0)
    has_mask = any(m not in BIAS_INPUT for m in sp.masks)
    assert (site.mask != "none") == has_mask, site.mask
    if has_mask:
        finite = any(m in FINITE_FILL for m in sp.masks)
        assert site.mask_fill == (torch.finfo(dtype).min if finite else -math.inf)
    assert site.bias == expected_bias(sp, t)
    q_heads = (B, H) if sp.rank == 4 else (B * H, 1)
    assert tuple(site.q_shape) == (*q_heads, M, D)
    kv_heads = (B, sp.heads_kv) if sp.rank == 4 else (B * H, 1)
    assert tuple(site.k_shape) == (*kv_heads, N, D)
    assert tuple(site.v_shape) == (*kv_heads, N, D)
    if sp.gqa:
        assert site.gqa_groups == H // HKV
        assert site.gqa_source == sp.gqa.split()[0]  # the short spellings are repeat_kv too
    else:
        assert site.gqa == "none"


def check_spelling(sp: Spelling, dtype: torch.dtype, *, explain: bool = True) -> None:
    fn = build(sp)
    t = make_inputs(sp, dtype)
    ref_out, ref_grads = _forward_backward(fn, _copy(t, torch.float64))
    eager_out, eager_grads = _forward_backward(fn, _copy(t))
    compiled = torch.compile(fn, backend="fusepass", options=OPTS)
    out, grads = _forward_backward(compiled, _copy(t))

    assert counters["fusepass"]["attention_fused"] == 1
    assert counters["fusepass"]["attention_rejected"] == 0
    assert not torch.isnan(ref_out).any()
    assert_close_to_reference(out, eager_out, ref_out, name="out")
    assert set(grads) == set(eager_grads)
    for name in grads:
        assert_close_to_reference(grads[name], eager_grads[name], ref_grads[name], name=f"grad {name}")

    if explain:
        report = fusepass.explain(fn, _copy(t), options=OPTS)
        assert len(report.sites) == 1, str(report)
        check_site(report.sites[0], sp, dtype, t)


def _cases(pairs):
    return [pytest.param(sp, id=f"{axis}={value}") for axis, value, sp in pairs]


# ---------------------------------------------------------------- each spelling alone
CONTRACTIONS = [
    ("qk", "@", Spelling()),
    ("qk", "torch.matmul", Spelling(qk="torch.matmul", pv="torch.matmul")),
    ("qk", "Tensor.matmul", Spelling(qk="Tensor.matmul", pv="Tensor.matmul")),
    ("qk", "torch.bmm", Spelling(qk="torch.bmm", pv="torch.bmm", rank=3)),
    *[("qk", name, Spelling(qk=name, pv="torch.bmm", rank=3)) for name in BADDBMMS],
    ("qk", "mixed matmul/@", Spelling(qk="torch.matmul", pv="@")),
    ("qk", "einsum bhqd,bhkd", Spelling(qk="einsum bhqd,bhkd", pv="einsum bhqk,bhkd")),
    ("qk", "einsum K as [D, N]", Spelling(qk="einsum K as [D, N]", pv="einsum bhqk,bhkd")),
    ("qk", "einsum ellipsis", Spelling(qk="einsum ellipsis", pv="einsum ellipsis")),
    ("qk", "einsum bqhd,bkhd", Spelling(qk="einsum bqhd,bkhd", pv="einsum bhqk,bkhd")),
    ("qk", "einsum 3-D", Spelling(qk="einsum 3-D", pv="einsum 3-D", rank=3)),
    ("qk", "einsum then @", Spelling(qk="einsum bhqd,bhkd", pv="@")),
    ("rank", "3 with @", Spelling(rank=3)),
]
K_TRANSPOSES = [("k_form", name, Spelling(k_form=name)) for name in K_FORMS] + [
    ("k_form", "permute 3-D", Spelling(k_form="permute", rank=3)),
]
SCALES = [("scale", name, Spelling(scale=name)) for name in SCORE_SCALES if name != "baddbmm alpha"] + [
    ("scale", "baddbmm alpha", Spelling(scale="baddbmm alpha", qk="baddbmm beta=0 empty", pv="torch.bmm", rank=3)),
]
SOFTMAX_CASES = [("softmax", name, Spelling(softmax=name)) for name in SOFTMAXES]
MASK_CASES = [("masks", name, Spelling(masks=(name,))) for name in MASKS] + [
    ("masks", "where finfo.min 3-D", Spelling(masks=("where finfo.min",), rank=3)),
    ("masks", "masked_fill -inf 3-D", Spelling(masks=("masked_fill -inf",), rank=3)),
    ("masks", "bias grad 3-D", Spelling(masks=("bias [1,H,M,N] grad",), rank=3)),
    ("masks", "pad+tril+pos bias", Spelling(masks=("pad [B,1,1,N]", "bias [1,H,M,N] grad", "tril == 0"))),
    ("masks", "bias+masked_fill+where", Spelling(masks=("bias [B,1,M,N]", "masked_fill -inf", "where -inf"))),
    ("masks", "pad+tril+finfo.min", Spelling(masks=("pad [B,1,1,N]", "masked_fill finfo.min", "where finfo.min"))),
]
OTHER_CASES = [
    ("gqa", "repeat_kv", Spelling(gqa="repeat_kv")),
    ("gqa", "repeat_kv short", Spelling(gqa="repeat_kv short")),
    ("gqa", "repeat_kv ellipsis", Spelling(gqa="repeat_kv ellipsis")),
    ("gqa", "repeat_interleave", Spelling(gqa="repeat_interleave")),
    ("softcap", "tanh(s / c) * c", Spelling(softcap=SOFTCAP)),
    *[("dropout", name, Spelling(dropout=name)) for name in DROPOUTS if name.endswith("eval")],
]
ALONE = CONTRACTIONS + K_TRANSPOSES + SCALES + SOFTMAX_CASES + MASK_CASES + OTHER_CASES

COMBINED = [
    Spelling(qk="einsum bhqd,bhkd", pv="@", scale="/ torch.full([], s)", softmax="Tensor.softmax",
             masks=("tril == 0",), dropout="nn.Dropout eval"),
    Spelling(qk="torch.bmm", pv="torch.bmm", rank=3, k_form="permute", scale="/ math.sqrt(d)",
             softmax="dtype=float32", masks=("masked_fill -inf",)),
    Spelling(qk="baddbmm beta=1 bias", pv="torch.bmm", rank=3, k_form="mT", scale="baddbmm alpha",
             softmax="nn.Softmax", masks=("bias [1,H,M,N] grad", "masked_fill finfo.min")),
    Spelling(qk="torch.matmul", pv="torch.matmul", gqa="repeat_kv", masks=("pad [B,1,1,N]", "where -inf"),
             softcap=SOFTCAP, softmax=".float() / type_as"),
    Spelling(qk="Tensor.matmul", pv="@", gqa="repeat_interleave", scale="sqrt on q and k", softmax=".to()",
             masks=("pad [B,1,1,N]", "bias [1,H,M,N] grad", "tril == 0"), dropout="torch.dropout eval"),
    Spelling(k_form="stored [D, N]", scale="q * s", softmax=".type()", masks=("bias [B,1,M,N]", "where finfo.min"),
             dropout="F.dropout eval"),
    Spelling(qk="einsum ellipsis", pv="einsum ellipsis", gqa="repeat_kv", scale="k * s", softcap=SOFTCAP,
             masks=("bias [1,H,M,N] grad", "tril == 0"), softmax="torch.softmax"),
    Spelling(qk="baddbmm beta=0 nan buffer", pv="einsum 3-D", rank=3, k_form="transpose", scale="baddbmm alpha",
             softmax="F.softmax positive dim", masks=("where -inf",)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sp", _cases(ALONE))
def test_each_spelling_alone(sp: Spelling, dtype):
    # NOTE: explain compiles a second time; once per spelling (fp32) keeps the file fast, and the
    # combined cases check the report in both dtypes.
    check_spelling(sp, dtype, explain=dtype == torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sp", [pytest.param(sp, id=str(sp)) for sp in COMBINED])
def test_spellings_combined(sp: Spelling, dtype):
    check_spelling(sp, dtype)


# ---------------------------------------------------------------- several sites, GQA operands
def test_two_sites_in_one_graph():
    first, second = Spelling(), Spelling(qk="einsum bhqd,bhkd", pv="einsum bhqk,bhkd", softmax="Tensor.softmax",
                                         masks=("tril == 0",))
    f1, f2 = build(first), build(second)

    def two_layers(t):
        h = f1(t)
        return f2({**t, "q": h})  # the second attention reads the first one's output as queries

    t = make_inputs(first, torch.float32)
    ref_out, ref_grads = _forward_backward(two_layers, _copy(t, torch.float64))
    eager_out, eager_grads = _forward_backward(two_layers, _copy(t))
    out, grads = _forward_backward(torch.compile(two_layers, backend="fusepass", options=OPTS), _copy(t))
    assert counters["fusepass"]["attention_fused"] == 2
    assert counters["fusepass"]["attention_rejected"] == 0
    assert_close_to_reference(out, eager_out, ref_out)
    for name in ("q", "k", "v"):
        assert_close_to_reference(grads[name], eager_grads[name], ref_grads[name], name=f"grad {name}")
    report = fusepass.explain(two_layers, _copy(t), options=OPTS)
    assert [s.fused for s in report.sites] == [True, True]
    lines = [SOFTMAXES[sp.softmax].__code__.co_firstlineno for sp in (first, second)]
    assert sorted(s.location for s in report.sites) == sorted(f"{THIS_FILE}:{n}" for n in lines)
    assert "2 of 2 attention sites fused" in str(report)


def _fused_graph(fn, *args) -> fx.GraphModule:
    """Capture Dynamo's graph of ``fn`` and run fusepass's rewrite on it (no inner compiler)."""
    graphs = []

    def capture(gm, example_inputs):
        fusepass.backend.fuse_attention(gm, fusepass.resolve_options(OPTS))
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture)(*args)
    assert len(graphs) == 1
    return graphs[0]


@pytest.mark.parametrize("how", list(GQA))
def test_gqa_op_gets_unrepeated_kv(how):
    sp = Spelling(gqa=how)
    t = make_inputs(sp, torch.float32)
    gm = _fused_graph(build(sp), _copy(t))
    calls = [n for n in gm.graph.nodes if n.target in FORWARD_OPS]
    assert len(calls) == 1
    q, k, v = (n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None
               for n in calls[0].args[:3])
    # k and v reach the op with HKV heads; nothing of the repeat survives in the graph.
    assert k is None or tuple(k.shape) == (B, HKV, N, D)
    assert v is None or tuple(v.shape) == (B, HKV, N, D)
    k_node, v_node = calls[0].args[1], calls[0].args[2]
    assert k_node.op == "placeholder" and v_node.op == "placeholder", (k_node, v_node)
    remaining = {str(n.target) for n in gm.graph.nodes}
    assert not {"expand", "repeat_interleave", "reshape"} & remaining, remaining
    # And it still runs: same result as eager.
    torch.testing.assert_close(gm(*[t_ for t_ in _graph_inputs(gm, t)])[0], build(sp)(t))


def _graph_inputs(gm: fx.GraphModule, t: dict):
    """Dynamo's placeholders for a dict argument are named after its keys (L_t_q_, ...)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        key = next(name for name in t if node.name.endswith(f"_{name}_"))
        out.append(t[key])
    return out


# ---------------------------------------------------------------- dropout in training
@pytest.mark.parametrize("name", [n for n in DROPOUTS if n.endswith("train")])
def test_dropout_training(name):
    """The fused op drops attention weights at rate p with torch's RNG: seeded runs repeat, the kept
    weights are softmax / (1 - p), and gradients are those of the dropped weights."""
    sp = Spelling(dropout=name)
    fn = build(sp)
    compiled = torch.compile(fn, backend="fusepass", options=OPTS)
    t = make_inputs(sp, torch.float32)
    # v = identity (Dv = N) makes the output the dropped attention weights themselves.
    eye = torch.eye(N).expand(B, H, N, N).contiguous()
    t["v"] = eye.clone().requires_grad_()

    torch.manual_seed(7)
    w1, grads = _forward_backward(compiled, _copy(t))
    assert counters["fusepass"]["attention_fused"] == 1
    torch.manual_seed(7)
    w2, _ = _forward_backward(compiled, _copy(t))
    torch.manual_seed(8)
    w3, _ = _forward_backward(compiled, _copy(t))
    assert torch.equal(w1, w2), "same seed, different dropout"
    assert not torch.equal(w1, w3), "different seeds, same dropout"

    probs = build(Spelling())({**_copy(t), "v": eye}).detach()  # softmax weights, no dropout
    kept = w1 != 0
    rate = 1.0 - kept.double().mean().item()
    # NOTE: B*H*M*N = 1152 Bernoulli(0.25) draws: std 0.0128; 5 sigma is 0.064.
    sigma = math.sqrt(P_DROP * (1 - P_DROP) / kept.numel())
    assert abs(rate - P_DROP) < 5 * sigma, rate
    torch.testing.assert_close(w1[kept], (probs / (1 - P_DROP))[kept])

    # Gradients are those of the same dropped weights, computed in float64 by hand.
    t64 = _copy(t, torch.float64)
    drop = kept.double() / (1 - P_DROP)
    ref = build(Spelling())({**t64, "v": torch.eye(N, dtype=torch.float64).expand(B, H, N, N)})
    q64, k64, v64 = t64["q"], t64["k"], t64["v"]
    ref = (ref * drop) @ v64
    (ref * projection(ref.float()).double()).sum().backward()
    for n, x in (("q", q64), ("k", k64), ("v", v64)):
        torch.testing.assert_close(grads[n], x.grad.float(), msg=lambda m, n=n: f"grad {n}: {m}")

    report = fusepass.explain(fn, _copy(t), options=OPTS)
    assert report.sites[0].fused and report.sites[0].dropout_p == pytest.approx(P_DROP)
