"""Layouts the matcher reads from the code itself: einsum subscripts in any order, K given as
``k.t()`` at ranks 2 and 3, and scale tensors in the precision they were built in.

Each of these crashed the compile or was left unfused (or fused with an unrounded scale)
before; every case checks fusion, the forward and the gradients against float64.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import assert_close_to_reference

OPTS = {"inner": "aot_eager"}


def _check(fn, shapes, dtype=torch.float32, fused=1):
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]

    def run(f, dt):
        args = [b.to(dt).requires_grad_() for b in base]
        out = f(*args)
        grads = torch.autograd.grad(out.float().square().sum(), args)
        return out, grads

    ref_out, ref_grads = run(fn, torch.float64)
    eager_out, eager_grads = run(fn, dtype)
    out, grads = run(torch.compile(fn, backend="fusepass", options=OPTS), dtype)
    assert counters["fusepass"]["attention_fused"] == fused
    assert_close_to_reference(out, eager_out, ref_out)
    for name, a, e, r in zip("qkv", grads, eager_grads, ref_grads):
        assert_close_to_reference(a, e, r, name=f"grad {name}")


# [B, N, H, D] operands: the token axis before the head axis, as several codebases write it.
EINSUMS = [
    ("bihd,bjhd->bhij", "bhij,bjhd->bihd"),
    ("bihd,bjhd->bhij", "bhij,bjhd->bhid"),
    ("bxhy,bzhy->bhxz", "bhxz,bzhw->bxhw"),  # any letters
    ("bihd,bjhd->hbij", "hbij,bjhd->bihd"),  # heads before batch in the scores
    ("...ihd,...jhd->...hij", "...hij,...jhd->...ihd"),
]


@pytest.mark.parametrize("qk, pv", EINSUMS)
def test_einsum_any_subscripts(qk, pv):
    def fn(q, k, v):
        return torch.einsum(pv, torch.einsum(qk, q, k).mul(0.5).softmax(-1), v)

    _check(fn, [(2, 9, 3, 4), (2, 7, 3, 4), (2, 7, 3, 5)])


def test_einsum_softmax_over_queries_is_not_fused():
    def fn(q, k, v):  # scores laid out [b, h, keys, queries]: softmax(-1) normalizes over queries
        return torch.einsum("bhji,bjhd->bihd", torch.einsum("bihd,bjhd->bhji", q, k).softmax(-1), v)

    _check(fn, [(2, 6, 3, 4), (2, 6, 3, 4), (2, 6, 3, 4)], fused=0)
    assert counters["fusepass"]["attention_rejected"] == 1


def test_rank2_k_t():
    _check(lambda q, k, v: torch.softmax(q @ k.t() * 0.5, -1) @ v, [(9, 4), (7, 4), (7, 6)])


def test_rank3_k_mT_and_transpose():
    _check(lambda q, k, v: torch.softmax(q @ k.mT * 0.5, -1) @ v, [(3, 9, 4), (3, 7, 4), (3, 7, 6)])
    _check(lambda q, k, v: torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1).bmm(v),
           [(3, 9, 4), (3, 7, 4), (3, 7, 6)], fused=2)


def test_rank3_reshape_of_permuted_k():
    def fn(q, k, v):  # k: [B, H, N, D] -> kᵀ as [B*H, D, N]
        return torch.softmax(torch.bmm(q, k.transpose(-1, -2).reshape(6, 4, 7)) * 0.5, -1) @ v

    _check(fn, [(6, 9, 4), (2, 3, 7, 4), (6, 7, 4)])


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_tensor_keeps_its_precision(scale_dtype):
    # 0.3 in bf16 is 0.30078125: eager multiplies by that, and so must the op.
    def fn(q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) * torch.tensor(0.3, dtype=scale_dtype), -1) @ v

    _check(fn, [(2, 2, 9, 4), (2, 2, 7, 4), (2, 2, 7, 4)])
