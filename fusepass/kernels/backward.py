"""Backward launcher: templates/attention_bwd.py.jinja -> three or four kernels -> ``attention_backward``.

Grids: ``attn_bwd_pre`` one program per (BLOCK_M query rows, b*Hq + h) (Delta, and the flags of
rows whose every score is -inf); with biases ``attn_bwd_rowstats``, like ``attn_bwd_dq``, one
program per (BLOCK_N query rows, b*Hq + h) (the row statistics that replace a too coarse
fp32 lse: see the template); ``attn_bwd_dkdv`` one
program per (BLOCK_N keys, b*Hkv + hkv), looping over the G query heads of the group and
their query tiles in steps of BLOCK_M (GQA: K/V read once, dK/dV summed in registers; no
atomics); ``attn_bwd_dq`` one program per (BLOCK_N query rows, b*Hq + h) stepping over key
tiles of BLOCK_M (dQ in a separate pass: deterministic, no atomics).  So in a backward
KernelConfig BLOCK_N is the size of the tile a program owns and BLOCK_M the step.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import Tensor

from fusepass.autotune.config import KernelConfig

from . import blockmap, render
from .heuristics import ConfigProvider, ConfigQuery, LaunchArgs, choose
from .launch_common import (cdiv, extra_args, head_dims, launch_fitting, natural_units, new_like, new_output, scalar_args,
                            seed_tensor, spec_module, strides4)
from .spec import KernelSpec, padded_head_dim

log = logging.getLogger(__name__)

_PRE_BLOCK_M = 64


def kernel_module(spec: KernelSpec, interpret: bool):
    return spec_module("attention_bwd.py.jinja", spec, interpret)


def _map_args(lists: Optional[blockmap.TileLists]) -> list:
    if lists is None:
        return list(blockmap.NO_MAP_ARGS)
    return lists.kernel_args()


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, biases, masks, seed,
    scale: float, softcap: float, dropout_p: float, mask_fill: float, mask_expr: str, mask_args,
    bias_needs_grad, config: Optional[KernelConfig] = None, autotune: Optional[bool] = None,
    config_for: Optional[ConfigProvider] = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dq, dk, dv (shapes and dtypes of q, k, v) and one gradient per bias (empty if not needed)."""
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if B * Hq * M == 0 or N == 0:
        # Nothing to launch: no score exists, so every gradient is a sum of nothing (zeros).
        dbiases = [torch.zeros(b.shape, dtype=b.dtype, device=b.device) if need else b.new_empty((0,))
                   for b, need in zip(biases, bias_needs_grad)]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbiases
    spec = KernelSpec.from_op(q, k, v, biases, masks, softcap, dropout_p, mask_fill, mask_expr, mask_args,
                              bias_needs_grad=bias_needs_grad)
    interpret = q.device.type != "cuda"
    cfg = choose(ConfigQuery("bwd", spec, q.dtype, B, Hq, Hkv, M, N, q.device, args=LaunchArgs(
        biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args), autotune=autotune), config, config_for)
    mod = kernel_module(spec, interpret)
    dq, dk, dv = new_like(q), new_like(k), new_like(v)
    dbiases, db_args, finish = [], [], []
    for b, mode in zip(biases, spec.bias_grad):
        if not mode:
            dbiases.append(b.new_empty((0,)))
        elif mode == "store":
            # Skipped (empty) tiles are never written: their gradient is 0.
            g = torch.zeros(b.shape, dtype=b.dtype, device=b.device) if spec.block_map else new_output(
                b.shape, b.dtype, b.device)
            dbiases.append(g)
            db_args += [g, *strides4(g)]
        else:
            acc = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
            dbiases.append(acc)
            finish.append((len(dbiases) - 1, b.dtype))
            db_args += [acc, *strides4(acc)]
    G = Hq // Hkv
    delta = new_output((B, Hq, M), torch.float32, q.device)
    # Per (batch, kv head): 1 when a row of its group has every score -inf (attn_bwd_pre).
    nan_rows = torch.zeros((B * Hkv,), dtype=torch.int32, device=q.device)
    shift = rowl2 = None
    if natural_units(spec):
        shift = new_output((B, Hq, M), torch.float32, q.device)
        rowl2 = new_output((B, Hq, M), torch.float32, q.device)
    seed_t = seed_tensor(seed, q.device) if spec.dropout else None
    common_tail = [Hq, G, M, N, *scalar_args(spec, scale, softcap, dropout_p, mask_fill, N)]
    extras = extra_args(biases, masks, mask_args)
    by_col = by_row = None
    if spec.block_map:
        # dK/dV: tiles of BLOCK_M queries x BLOCK_N keys, per key tile; dQ: BLOCK_N x BLOCK_M,
        # per query tile.  The masks' classes come from this call's forward when it kept them.
        data_kv = blockmap.data_classes(masks, M, N, cfg.BLOCK_M, cfg.BLOCK_N)
        data_q = blockmap.data_classes(masks, M, N, cfg.BLOCK_N, cfg.BLOCK_M)
        by_col = blockmap.call_lists(mask_expr, mask_args, masks, B, Hq, M, N, cfg.BLOCK_M, cfg.BLOCK_N,
                                     q.device, by="col", data=data_kv)
        by_row = blockmap.call_lists(mask_expr, mask_args, masks, B, Hq, M, N, cfg.BLOCK_N, cfg.BLOCK_M,
                                     q.device, by="row", data=data_q)
    with render.interpreting() if interpret else contextlib.nullcontext():
        mod.attn_bwd_pre[(cdiv(M, _PRE_BLOCK_M), B * Hq)](
            out, grad_out, lse, delta, nan_rows, *out.stride(), *grad_out.stride(), Hq, G, M,
            HEAD_DIM_V=Dv, HEAD_DIM_V_P=padded_head_dim(Dv), BLOCK_M=_PRE_BLOCK_M,
        )
        if shift is not None:
            # Tiles shaped like attn_bwd_dq's (which fit whenever dq's do); only query tiles
            # holding a row with a coarse lse loop over the keys.
            launch_fitting(("rowstats", spec), cfg, lambda c: mod.attn_bwd_rowstats[(cdiv(M, c.BLOCK_N), B * Hq)](
                q, k, lse, shift, rowl2, *extras, *q.stride(), *k.stride(),
                *common_tail, **head_dims(spec), BLOCK_M=c.BLOCK_N, BLOCK_N=c.BLOCK_M,
                num_warps=c.num_warps, num_stages=c.num_stages,
            ))
        launch_fitting(("dkdv", spec), cfg, lambda c: mod.attn_bwd_dkdv[(cdiv(N, c.BLOCK_N), B * Hkv)](
            q, k, v, grad_out, lse, delta, shift, rowl2, nan_rows, dk, dv, seed_t, *_map_args(by_col), *extras, *db_args,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            *common_tail, **head_dims(spec), BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
            num_warps=c.num_warps, num_stages=c.num_stages,
        ))
        launch_fitting(("dq", spec), cfg, lambda c: mod.attn_bwd_dq[(cdiv(M, c.BLOCK_N), B * Hq)](
            q, k, v, grad_out, lse, delta, shift, rowl2, dq, seed_t, *_map_args(by_row), *extras,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            *common_tail, **head_dims(spec), BLOCK_M=c.BLOCK_N, BLOCK_N=c.BLOCK_M,
            num_warps=c.num_warps, num_stages=c.num_stages,
        ))
    for i, dtype in finish:
        dbiases[i] = dbiases[i].to(dtype)
    return dq, dk, dv, dbiases
