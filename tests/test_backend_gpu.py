"""The backend on CUDA: CUDA graphs (mode="reduce-overhead") and dynamic lengths through the kernels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fusepass
from conftest import assert_close_to_reference

pytestmark = pytest.mark.gpu


class CausalAttention(nn.Module):
    def __init__(self, max_len: int = 4096):
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        att = att.masked_fill(self.tril[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att.float(), dim=-1).type_as(q) @ v


def _qkv(T: int, dtype=torch.bfloat16):
    return [torch.randn(2, 8, T, 64, device="cuda", dtype=dtype) for _ in range(3)]


def _check(got, model, q, k, v):
    with torch.no_grad():
        eager = model(q, k, v)
        ref = model.double()(q.double(), k.double(), v.double())
        model.float()
    assert_close_to_reference(got, eager, ref)


def test_reduce_overhead_runs_the_kernels_under_cuda_graphs():
    model = CausalAttention().cuda()
    compiled = torch.compile(model, backend="fusepass", mode="reduce-overhead")
    q, k, v = _qkv(512)
    report = fusepass.explain(model, q, k, v)
    (site,) = report.sites
    assert site.fused and site.runs_on.startswith("triton, prefill family") and site.mask == "causal"
    with torch.no_grad():
        for _ in range(4):  # warm-up, record, replays
            q, k, v = _qkv(512)
            got = compiled(q, k, v).clone()
            _check(got, model, q, k, v)
    assert counters["fusepass"]["attention_fused"] >= 1


def test_dynamic_lengths_compile_at_most_twice_on_cuda():
    model = CausalAttention().cuda()
    graphs = []

    def backend(gm, example_inputs, **kw):
        graphs.append(gm)
        return fusepass.fusepass_backend(gm, example_inputs, **kw)

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for T in (256, 384, 640, 1000):
            q, k, v = _qkv(T)
            _check(compiled(q, k, v), model, q, k, v)
    assert len(graphs) <= 2
    assert counters["fusepass"]["attention_fused"] == len(graphs)
