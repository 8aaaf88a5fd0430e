"""Scales Dynamo makes symbolic: a float attribute whose value changed between compiles."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

import fusepass
from conftest import assert_close_to_reference


class Attn(torch.nn.Module):
    def __init__(self, scaling: float):
        super().__init__()
        self.scaling = scaling

    def forward(self, q, k, v):
        return torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scaling, dim=-1) @ v


def test_symbolic_scale_is_folded_into_q():
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    reports = [fusepass.explain(Attn(s), q, k, v, options={"inner": "aot_eager"}) for s in (0.25, 0.2)]
    # The second compile sees self.scaling as a symbolic float (Dynamo's automatic dynamic).
    for report, s in zip(reports, (0.25, 0.2)):
        (site,) = report.sites
        assert site.fused, site.reason
        assert abs(site.scale - s) < 1e-12
    for s in (0.25, 0.2, 0.3):
        model = Attn(s)
        compiled = torch.compile(model, backend="fusepass", options={"inner": "aot_eager"})
        got = compiled(q, k, v)
        (g,) = torch.autograd.grad(got.sum(), q)
        eager = model(q, k, v)
        (ge,) = torch.autograd.grad(eager.sum(), q)
        ref = model(q.double(), k.double(), v.double())
        (gr,) = torch.autograd.grad(ref.sum(), q)
        assert_close_to_reference(got.detach(), eager.detach(), ref.detach())
        assert_close_to_reference(g, ge, gr, name="dq")
    assert counters["fusepass"]["attention_rejected"] == 0
