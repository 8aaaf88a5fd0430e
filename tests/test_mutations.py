"""In-place writes around and inside attention: they survive a fused site, or the site is refused.

Every case here gave a wrong answer before graph/mutations.py: writes dropped by dead-code
elimination after the rewrite, or in-place ops read as if they were not there.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fusepass

B, H, N, D = 2, 2, 8, 4
FMIN = torch.finfo(torch.float32).min


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, N, D, generator=g, requires_grad=requires_grad) for _ in range(3)]


def _attend(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v


class BufferedAttention(nn.Module):
    """A counter and a KV cache written in place before the attention reads the cache."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("k_cache", torch.zeros(B, H, N, D))
        self.register_buffer("v_cache", torch.zeros(B, H, N, D))

    def forward(self, q, k_new, v_new, pos):
        self.calls.add_(1)
        self.k_cache.index_copy_(2, pos, k_new)
        self.v_cache[:, :, pos] = v_new
        return _attend(q, self.k_cache, self.v_cache)


class NormedAttention(nn.Module):
    """Module state (BatchNorm running statistics) beside a fused site, in training."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(D)
        self.proj = nn.Linear(D, D)

    def forward(self, q, k, v):
        q = self.norm(q.reshape(-1, D)).reshape(q.shape)
        return self.proj(_attend(q, k, v))


def _compile(fn, inner="aot_eager"):
    return torch.compile(fn, backend="fusepass", options={"inner": inner})


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_cache_and_counter_writes_survive(inner):
    eager_mod, fused_mod = BufferedAttention(), BufferedAttention()
    compiled = _compile(fused_mod, inner)
    q, k, v = _inputs()
    for step in range(3):
        pos = torch.tensor([step, step + 3])
        args = (q, k[:, :, :2] + step, v[:, :, :2] - step, pos)
        torch.testing.assert_close(compiled(*args), eager_mod(*args))
    assert counters["fusepass"]["attention_fused"] >= 1
    for name in ("calls", "k_cache", "v_cache"):
        torch.testing.assert_close(getattr(fused_mod, name), getattr(eager_mod, name), msg=name)
    assert int(fused_mod.calls) == 3


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_batchnorm_statistics_update_in_training(inner):
    torch.manual_seed(0)
    eager_mod = NormedAttention().train()
    fused_mod = NormedAttention().train()
    fused_mod.load_state_dict(eager_mod.state_dict())
    compiled = _compile(fused_mod, inner)
    for _ in range(2):
        q, k, v = _inputs(requires_grad=True)
        compiled(q, k, v).square().sum().backward()
        eager_mod(*[t.detach().clone().requires_grad_() for t in (q, k, v)]).square().sum().backward()
    assert counters["fusepass"]["attention_fused"] >= 1
    assert int(fused_mod.norm.num_batches_tracked) == 2
    torch.testing.assert_close(fused_mod.norm.running_mean, eager_mod.norm.running_mean)
    torch.testing.assert_close(fused_mod.norm.running_var, eager_mod.norm.running_var)
    torch.testing.assert_close(fused_mod.proj.weight.grad, eager_mod.proj.weight.grad)


def test_write_into_an_input_before_the_site():
    buf = torch.zeros(3)

    def fn(q, k, v, buf):
        buf.add_(1)
        return _attend(q, k, v)

    q, k, v = _inputs()
    out = _compile(fn)(q, k, v, buf)
    torch.testing.assert_close(out, _attend(q, k, v))
    assert counters["fusepass"]["attention_fused"] == 1
    assert buf.tolist() == [1.0, 1.0, 1.0]


def _scores_div_(q, k, v):
    s = q @ k.transpose(-1, -2)
    s.div_(math.sqrt(D))
    return s.softmax(-1) @ v


def _scores_masked_fill_(q, k, v):
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s.masked_fill_(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _k_written_between(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    k.mul_(2)
    return p @ v


@pytest.mark.parametrize("fn, written", [
    (_scores_div_, "div_"), (_scores_masked_fill_, "2 users"), (_k_written_between, "mul_"),
])
def test_in_place_inside_the_site_is_refused(fn, written):
    q, k, v = _inputs()
    expected = fn(q.clone(), k.clone(), v.clone())
    out = _compile(fn)(q.clone(), k.clone(), v.clone())
    torch.testing.assert_close(out, expected)
    assert counters["fusepass"]["attention_fused"] == 0
    report = fusepass.explain(fn, q.clone(), k.clone(), v.clone())
    assert not report.sites[0].fused and written in report.sites[0].reason


class ScaledInPlace(nn.Module):
    """``q.mul_(scale)`` on a projection's output, then attention over it."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)

    def forward(self, x, k, v):
        q = self.q_proj(x)
        q.mul_(D ** -0.5)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_query_scaled_in_place_fuses_with_the_written_value():
    torch.manual_seed(0)
    mod = ScaledInPlace()
    x, k, v = _inputs()
    with torch.no_grad():
        expected = mod(x, k, v)
        out = _compile(mod)(x, k, v)
    torch.testing.assert_close(out, expected)
    assert counters["fusepass"]["attention_fused"] == 1


def _mask_built_in_place(q, k, v):
    # Older transformers code: a finfo.min tensor, then the visible part zeroed in place.
    mask = torch.full((N, N), FMIN, device=q.device)
    mask.masked_fill_(torch.ones(N, N, dtype=torch.bool, device=q.device).tril(), 0.0)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + mask, dim=-1) @ v


def test_mask_built_in_place_is_read_as_data():
    q, k, v = _inputs()
    out = _compile(_mask_built_in_place)(q, k, v)
    torch.testing.assert_close(out, _mask_built_in_place(q, k, v))
    assert counters["fusepass"]["attention_fused"] == 1
    report = fusepass.explain(_mask_built_in_place, q, k, v)
    site = report.sites[0]
    assert site.fused and site.mask == "none" and site.bias != "none"  # kept as a tensor, not a predicate


class ScaledInPlaceView(nn.Module):
    """``q *= scale`` on a view of a projection: the write is visible through the projection."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(H * D, H * D)

    def forward(self, x, k, v):
        q = self.q_proj(x).view(B, N, H, D).transpose(1, 2)
        q *= D ** -0.5
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_query_scaled_in_place_through_a_view():
    torch.manual_seed(0)
    mod = ScaledInPlaceView()
    x = torch.randn(B, N, H * D)
    _, k, v = _inputs()
    with torch.no_grad():
        expected = mod(x, k, v)
        out = _compile(mod)(x, k, v)
    torch.testing.assert_close(out, expected)


def test_private_in_place_add_reads_as_the_functional_op():
    def fn(q, k, v):
        s = q @ k.transpose(-1, -2)
        s += torch.zeros(N, N, device=q.device).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), FMIN)
        return F.softmax(s, dim=-1) @ v

    q, k, v = _inputs()
    out = _compile(fn)(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    assert counters["fusepass"]["attention_fused"] == 1
