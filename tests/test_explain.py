"""``fusepass.explain`` runs the model as its docstring says: without gradients unless an
input asks for them."""

from __future__ import annotations

import torch
import torch.nn as nn

import fusepass


class BiasedAttention(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 1, n, n))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5 + self.bias, dim=-1) @ v


def test_explain_runs_without_grad_unless_an_input_requires_it():
    mod = BiasedAttention(6)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    site = fusepass.explain(mod, q, k, v).sites[0]
    assert site.fused and "(grad)" not in site.bias  # no_grad: the parameter's grad is not traced
    site = fusepass.explain(mod, q.requires_grad_(), k, v).sites[0]
    assert site.fused and "(grad)" in site.bias
    assert torch.is_grad_enabled()
