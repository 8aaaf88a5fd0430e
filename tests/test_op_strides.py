"""The op's fake implementations promise the strides the real ones return (Inductor checks them)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusepass  # noqa: F401  (registers torch.ops.fusepass)


def _inputs():
    B, H, M, D = 2, 4, 33, 16
    # q/k/v as transposed views of [B, N, H, D] projections; a T5-style bias: a permuted embedding.
    q, k, v = (torch.randn(B, M, H, D).transpose(1, 2) for _ in range(3))
    bias = torch.randn(M, M, H).permute(2, 0, 1).unsqueeze(0)
    pad = torch.randn(B, 1, 1, M)
    return q, k, v, [bias, pad]


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["reference", "kernels"])
def test_fake_strides_match_real(monkeypatch, interpret):
    monkeypatch.setenv("FUSEPASS_INTERPRET", interpret)
    q, k, v, biases = _inputs()
    features = (None, 0.25, 0.0, 0.0, float("-inf"), "j <= i", [])
    out, lse = torch.ops.fusepass.attention(q, k, v, biases, [], *features)
    grad = torch.randn_like(out)
    real = torch.ops.fusepass.attention_backward(grad, q, k, v, out, lse, biases, [], *features, [True, True])
    with FakeTensorMode() as mode:
        fq, fk, fv, fg, fo, fl = (mode.from_tensor(t) for t in (q, k, v, grad, out, lse))
        fb = [mode.from_tensor(b) for b in biases]
        fout, flse = torch.ops.fusepass.attention(fq, fk, fv, fb, [], *features)
        fake = torch.ops.fusepass.attention_backward(fg, fq, fk, fv, fo, fl, fb, [], *features, [True, True])
    assert fout.stride() == out.stride() and flse.stride() == lse.stride()
    for name, r, f in zip(("dq", "dk", "dv"), real[:3], fake[:3]):
        assert r.stride() == f.stride(), f"{name}: real {r.stride()} fake {f.stride()}"
    for r, f in zip(real[3], fake[3]):
        assert r.stride() == f.stride(), f"dbias: real {r.stride()} fake {f.stride()}"
