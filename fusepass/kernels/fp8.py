"""The FP8 forward (e4m3, inference): rotation, quantization, and the prefill kernel's fp8 variant.

Q and K are rotated by one random orthogonal transform R (a Hadamard matrix with random signs,
normalized) before they are quantized: (q R)(k R)^T = q k^T, and the rotation spreads an
outlier channel over all channels, so a row's largest element (which sets its scale) is closer
to its typical one.  Head dims that are not a power of two are zero-padded first (padding
changes no dot product).  Scales are per row of q, per key of k and per channel of v: finer than
per-tile scales, and independent of the tile sizes a config picks.  The kernel multiplies each
q.k tile by its row and key scales, and the probabilities by P_SCALE before their rounding
(templates/_fwd_body.py.jinja); v's channel scales apply once, to the output.  The rotation and
the scales are computed on the device (templates/fp8_quantize.py.jinja).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fusepass.call import AttentionCall

from . import forward, render
from .launch_common import cdiv, launches
from .limits import next_pow2

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SERVED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
_ROTATION_SEED = 0x5EED  # any fixed seed: q and k of one call must share R, nothing else depends on it


def refusal(call: AttentionCall) -> Optional[str]:
    """None when the fp8 forward serves ``call``, else why it runs in its own dtype."""
    if call.q.dtype not in SERVED_DTYPES:
        return f"fp8 serves float16 and bfloat16 inputs, not {call.q.dtype}"
    if call.dropout_p > 0:
        return "dropout (training)"
    if max(call.head_dim, call.v_head_dim) > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    if call.empty:
        return "no scores (an empty call)"
    return None


@functools.lru_cache(maxsize=16)
def signed_hadamard(dim: int, device: torch.device) -> Tensor:
    """diag(random signs) @ H [dim, dim] fp32, entries +-1: H is Sylvester's Hadamard matrix
    (``dim`` a power of two).  Divided by sqrt(dim) it is orthogonal (``rotation``)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"fusepass fp8: the rotation needs a power-of-two size, got {dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(_ROTATION_SEED + dim)
    signs = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1
    return (signs[:, None] * h).to(device)


def rotation(dim: int, device: torch.device) -> Tensor:
    """R [dim, dim] fp32, orthogonal: the signed Hadamard matrix over sqrt(dim)."""
    return signed_hadamard(dim, device) / dim ** 0.5


def rotated_dim(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


class Fp8Inputs(NamedTuple):
    q: Tensor  # [B, Hq, M, Dr] e4m3, rotated (Dr = rotated_dim(D))
    k: Tensor  # [B, Hkv, N, Dr] e4m3, rotated
    v: Tensor  # [B, Hkv, N, Dv] e4m3, keys contiguous (a transposed [B, Hkv, Dv, N] buffer)
    q_scale: Tensor  # [B, Hq, M] fp32
    k_scale: Tensor  # [B, Hkv, N] fp32
    v_scale: Tensor  # [B, Hkv, Dv] fp32


def quantize(q: Tensor, k: Tensor, v: Tensor) -> Fp8Inputs:
    """The kernel's fp8 inputs, made by templates/fp8_quantize.py.jinja (one pass over q, one over
    k, two over v): q and k rotated then scaled per row, v per channel.  v keeps its keys
    contiguous: P @ V contracts over keys, and an e4m3 operand of Hopper's wgmma must be
    contiguous along the contracted axis (q and k are, along D); the kernel reads v by strides."""
    interpret = q.device.type != "cuda"
    mod = render.load("fp8_quantize.py.jinja", {"upcast": interpret, "e4m3_round": interpret}, interpret=interpret)
    Dr = rotated_dim(q.shape[-1])
    R = signed_hadamard(Dr, q.device)
    with render.interpreting() if interpret else contextlib.nullcontext():
        q8, sq = _rows(mod, q, R, Dr, interpret)
        k8, sk = _rows(mod, k, R, Dr, interpret)
        v8, sv = _channels(mod, v, interpret)
    return Fp8Inputs(q8, k8, v8, sq, sk, sv)


def _rows(mod, x: Tensor, R: Tensor, Dr: int, interpret: bool) -> tuple[Tensor, Tensor]:
    B, H, L, D = x.shape
    out = torch.empty((B, H, L, Dr), dtype=E4M3, device=x.device)
    scale = torch.empty((B, H, L), dtype=torch.float32, device=x.device)
    block = 16 if interpret else 64
    if out.numel():
        mod.quantize_rows[(cdiv(L, block), B * H)](x, R, out, scale, *x.stride(), H, L, D, Dr ** -0.5, DR=Dr,
                                                   CHUNK=min(Dr, 64), BLOCK=block)
    return out, scale


def _channels(mod, v: Tensor, interpret: bool) -> tuple[Tensor, Tensor]:
    B, H, N, Dv = v.shape
    out = torch.empty((B, H, Dv, N), dtype=E4M3, device=v.device)
    scale = torch.empty((B, H, Dv), dtype=torch.float32, device=v.device)
    if out.numel():
        dv_p = max(16, next_pow2(Dv))
        # About 8k elements a tile on the GPU (64 keys at Dv = 128): no spills at Dv = 256.
        mod.quantize_channels[(B * H,)](v, out, scale, *v.stride(), H, N, Dv, DV_P=dv_p,
                                        BLOCK_N=32 if interpret else max(16, 8192 // dv_p))
    return out.transpose(-1, -2), scale


def attention_forward(call: AttentionCall, config_for=None) -> tuple[Tensor, Tensor]:
    """out [B, Hq, M, Dv] (v's dtype), lse [B, Hq, M] fp32 through the e4m3 kernel
    (``refusal(call)`` must be None).  The scale is the call's; R keeps q.k."""
    launches["fp8"] += 1
    x = quantize(call.q, call.k, call.v)
    # The tuner times candidates on the call alone, without the scales: fp8 launches take the
    # heuristic config.
    run = dataclasses.replace(call.run, autotune=False)
    qcall = AttentionCall.build(x.q, x.k, x.v, call.biases, call.masks, call.seed, scale=call.scale,
                                softcap=call.softcap, dropout_p=call.dropout_p, mask_fill=call.mask_fill,
                                mask_expr=call.mask_expr, mask_args=call.mask_args, run=run)
    return forward.attention_forward(qcall, config_for=config_for, scales=(x.q_scale, x.k_scale, x.v_scale),
                                     out_dtype=call.v.dtype)
