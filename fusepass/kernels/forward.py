"""Forward launcher: templates/attention_fwd.py.jinja -> ``attn_fwd`` -> ``attention_forward``."""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import Tensor

from fusepass.autotune.config import KernelConfig

from . import blockmap, render
from .heuristics import ConfigProvider, ConfigQuery, LaunchArgs, choose
from .launch_common import cdiv, spec_module, extra_args, head_dims, launch_fitting, new_output, scalar_args, seed_tensor
from .spec import KernelSpec

log = logging.getLogger(__name__)


def kernel_module(spec: KernelSpec, interpret: bool):
    return spec_module("attention_fwd.py.jinja", spec, interpret)


def grid(M: int, B: int, Hq: int, cfg: KernelConfig) -> tuple[int, int]:
    """One program per (query tile of BLOCK_M rows, batch * query head); each program walks
    all key tiles its block-map row lists (or all of them) with an online softmax."""
    return (cdiv(M, cfg.BLOCK_M), B * Hq)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, biases, masks, seed, scale: float, softcap: float,
    dropout_p: float, mask_fill: float, mask_expr: str, mask_args, config: Optional[KernelConfig] = None,
    autotune: Optional[bool] = None, config_for: Optional[ConfigProvider] = None,
) -> tuple[Tensor, Tensor]:
    """out [B, Hq, M, Dv] (v's dtype), lse [B, Hq, M] fp32; the op's semantics exactly."""
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if B * Hq * M == 0 or N == 0:
        # Nothing to launch.  No keys: eager's softmax over zero keys is an empty row, P @ V a
        # sum of nothing (zeros) and logsumexp -inf.
        return (torch.zeros((B, Hq, M, Dv), dtype=v.dtype, device=q.device),
                torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device))
    spec = KernelSpec.from_op(q, k, v, biases, masks, softcap, dropout_p, mask_fill, mask_expr, mask_args)
    interpret = q.device.type != "cuda"
    cfg = choose(ConfigQuery("fwd", spec, q.dtype, B, Hq, Hkv, M, N, q.device, args=LaunchArgs(
        biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args), autotune=autotune), config, config_for)
    mod = kernel_module(spec, interpret)
    out = new_output((B, Hq, M, Dv), v.dtype, q.device)
    lse = new_output((B, Hq, M), torch.float32, q.device)
    if spec.block_map:
        data = None
        if masks:
            # The masks' tile classes, once per call: kept (at a granularity the backward's
            # tiles are unions of) for the backward of this call.
            g = blockmap.granule(cfg.BLOCK_M, cfg.BLOCK_N)
            base = blockmap.data_classes(masks, M, N, g, g, store=True)
            data = blockmap.coarsen(base, cfg.BLOCK_M // g, cfg.BLOCK_N // g)
        map_args = blockmap.call_lists(mask_expr, mask_args, masks, B, Hq, M, N, cfg.BLOCK_M, cfg.BLOCK_N,
                                       q.device, by="row", data=data).kernel_args()
    else:
        map_args = list(blockmap.NO_MAP_ARGS)
    with render.interpreting() if interpret else contextlib.nullcontext():
        launch_fitting(("fwd", spec), cfg, lambda c: _launch(
            mod, q, k, v, out, lse, seed, spec, c, map_args, biases, masks, mask_args,
            scale, softcap, dropout_p, mask_fill))
    return out, lse


def _launch(mod, q, k, v, out, lse, seed, spec, cfg, map_args, biases, masks, mask_args,
            scale, softcap, dropout_p, mask_fill):
    B, Hq, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    mod.attn_fwd[grid(M, B, Hq, cfg)](
        q, k, v, out, lse, seed_tensor(seed, q.device) if spec.dropout else None,
        *map_args,
        *extra_args(biases, masks, mask_args),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, M, N,
        *scalar_args(spec, scale, softcap, dropout_p, mask_fill, N),
        **head_dims(spec),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
