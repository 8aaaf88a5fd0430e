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


def gqa_decode(q, k, v):
    """One new query per sequence against a static cache, GQA written as repeat_kv."""
    G = q.shape[1] // k.shape[1]
    k = k[:, :, None].expand(-1, -1, G, -1, -1).flatten(1, 2)
    v = v[:, :, None].expand(-1, -1, G, -1, -1).flatten(1, 2)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return F.softmax(s.float(), dim=-1).type_as(q) @ v


def test_reduce_overhead_runs_the_decode_family_under_cuda_graphs():
    """A decode step (query length 1, a static cache of 4096 keys) recorded and replayed: the
    decode family's launches are capturable (no host sync, no host block map)."""
    from fusepass.kernels import launch_common

    compiled = torch.compile(gqa_decode, backend="fusepass", mode="reduce-overhead")
    k, v = (torch.randn(2, 2, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    report = fusepass.explain(gqa_decode, torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16), k, v)
    assert report.sites[0].runs_on == "triton, decode family (split-KV)"
    before = launch_common.launches["decode"]
    with torch.no_grad():
        for _ in range(4):  # warm-up, record, replays
            q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
            got = compiled(q, k, v).clone()
            eager = gqa_decode(q, k, v)
            ref = gqa_decode(q.double(), k.double(), v.double())
            assert_close_to_reference(got, eager, ref)
    assert launch_common.launches["decode"] > before
