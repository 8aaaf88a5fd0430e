"""Shared pieces of the kernel tests: a float64 dense reference of the op and a case runner."""

from __future__ import annotations

import dataclasses
import math

import torch

from conftest import assert_close_to_reference
from fusepass.masks.predicate import dense_keep
from fusepass.ops import dropout as dr
from fusepass.ops.dispatch import backward_call, forward_call


def dense_attention(q, k, v, biases, masks, seed, scale, softcap, p, fill, expr, args):
    """The op's formula on whole tensors, in the dtype of q (float64 for the reference).

    Rows that see no key under a -inf fill are NaN and spread NaN into dV (and into dQ/dK
    where a bias made them -inf), as eager's do; the op returns the same."""
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, 1)
    v = v.repeat_interleave(G, 1)
    s = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    for b in biases:
        s = s + b.to(s.dtype)
    B, H, M, N = s.shape
    keep = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    for m in masks:
        keep = keep & m
    if expr:
        keep = keep & dense_keep(expr, B, H, M, N, args, device=s.device)
    s = torch.where(keep, s, torch.tensor(fill, dtype=s.dtype, device=s.device))
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, -1)
    pm = torch.softmax(s.float() if s.dtype != torch.float64 else s, -1).to(s.dtype)
    if p > 0:
        rows = torch.arange(B * H * M, device=s.device).view(B, H, M, 1)
        cols = torch.arange(N, device=s.device).view(1, 1, 1, N)
        pm = pm * dr.keep_mask(int(seed), rows, cols, p) / (1 - p)
    return pm @ v, lse


@dataclasses.dataclass
class Case:
    B: int = 1
    Hq: int = 2
    Hkv: int = 2
    M: int = 17
    N: int = 17
    D: int = 16
    Dv: int | None = None
    dtype: torch.dtype = torch.float32
    bias_shapes: tuple = ()  # each broadcastable to [B, Hq, M, N]
    bias_grad: bool = True
    mask_shapes: tuple = ()
    expr: str = ""
    args: tuple = ()
    softcap: float = 0.0
    dropout_p: float = 0.0
    fill: float = -math.inf
    transposed: bool = False  # q/k/v as [B, N, H, D] memory transposed to [B, H, N, D]

    def tensors(self, device):
        Dv = self.Dv or self.D

        def make(B, H, L, D):
            if self.transposed:
                return torch.randn(B, L, H, D, device=device, dtype=self.dtype).transpose(1, 2)
            return torch.randn(B, H, L, D, device=device, dtype=self.dtype)

        q, k, v = make(self.B, self.Hq, self.M, self.D), make(self.B, self.Hkv, self.N, self.D), make(self.B, self.Hkv, self.N, Dv)
        biases = [torch.randn(s, device=device, dtype=self.dtype) for s in self.bias_shapes]
        masks = [torch.rand(s, device=device) > 0.25 for s in self.mask_shapes]
        seed = torch.tensor(1234 + self.M * 7 + self.N, dtype=torch.int64)
        return q, k, v, biases, masks, seed


def run_case(case: Case, device="cpu", backward=True, factor=4.0):
    from fusepass.kernels.backward import attention_backward
    from fusepass.kernels.forward import attention_forward

    q, k, v, biases, masks, seed = case.tensors(device)
    scale = case.D ** -0.5
    feats = (seed, scale, case.softcap, case.dropout_p, case.fill, case.expr, list(case.args))
    out, lse = attention_forward(forward_call(q, k, v, biases, masks, *feats))

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, *biases)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *biases)]
    ref, ref_lse = dense_attention(*leaves64[:3], leaves64[3:], masks, *feats)
    eager, _ = dense_attention(*leaves[:3], leaves[3:], masks, *feats)
    assert_close_to_reference(out, eager, ref, factor=factor, name="out")
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4, equal_nan=True)
    if not backward:
        return
    need = [case.bias_grad] * len(biases)
    do = torch.randn_like(out)
    grads = attention_backward(backward_call(do, q, k, v, out, lse, biases, masks, *feats, need))
    assert_grads_match(case, grads, (q, k, v, biases, masks), feats, do, factor)


def assert_grads_match(case: Case, grads, tensors, feats, do, factor=4.0):
    """A backward's (dq, dk, dv, bias gradients) against float64 autograd of the dense
    reference, by the tests' rule (``factor`` x eager's own error); a bias without a gradient
    must get an empty tensor."""
    q, k, v, biases, masks = tensors
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, *biases)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *biases)]
    ref, _ = dense_attention(*leaves64[:3], leaves64[3:], masks, *feats)
    eager, _ = dense_attention(*leaves[:3], leaves[3:], masks, *feats)
    g64 = torch.autograd.grad(ref, leaves64, do.double())
    g = torch.autograd.grad(eager, leaves, do)
    dq, dk, dv, dbs = grads
    names = ["dq", "dk", "dv"] + [f"dbias{i}" for i in range(len(biases))]
    got = [dq, dk, dv] + list(dbs)
    for name, a, e, r in zip(names, got, g, g64):
        if name.startswith("dbias") and not case.bias_grad:
            assert a.numel() == 0
            continue
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert_close_to_reference(a, e, r, factor=factor, name=name)


EMPTY_SHAPES = [  # (B, Hq, Hkv, M, N): empty problems eager accepts
    (0, 4, 2, 5, 7),
    (2, 4, 2, 0, 7),
    (2, 4, 2, 5, 0),
    (2, 0, 0, 5, 7),
    (0, 2, 2, 0, 0),
]
