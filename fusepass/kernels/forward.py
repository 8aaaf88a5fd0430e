"""Forward launcher: templates/attention_fwd.py.jinja -> ``attn_fwd`` -> ``attention_forward``.

A call's launch is planned once per call signature (shapes, strides, dtypes, parameters: see
``fusepass.call``): the kernel spec, the config, the rendered kernel, the grid, the scalar
arguments and a predicate's block map.  A later call with the same signature allocates its
outputs and launches; only block maps read from mask tensors are computed per call (they
depend on the masks' contents).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from fusepass.autotune.config import ForwardConfig
from fusepass.call import AttentionCall, out_strides, out_tensor

from . import blockmap, render
from .heuristics import ConfigProvider, ConfigQuery, choose
from .launcher import Launcher
from .launch_common import (PlanCache, cdiv, extra_args, head_dims, launch_fitting, launches, new_output, plan_key,
                            scalar_args, seed_tensor, spec_module)
from .spec import KernelSpec

log = logging.getLogger(__name__)


def kernel_module(spec: KernelSpec, interpret: bool):
    return spec_module("attention_fwd.py.jinja", spec, interpret)


def grid(M: int, B: int, Hq: int, cfg: ForwardConfig) -> tuple[int, int]:
    """One program per (query tile of BLOCK_M rows, batch * query head); each program walks
    all key tiles its block-map row lists (or all of them) with an online softmax."""
    return (cdiv(M, cfg.BLOCK_M), B * Hq)


@dataclasses.dataclass
class _Plan:
    spec: KernelSpec
    cfg: ForwardConfig  # the fitted config once the first launch ran
    kernel: object  # the rendered module's attn_fwd (a triton.JITFunction)
    grid: tuple[int, int]
    tail: tuple  # strides, sizes and scalars after the tensor arguments (fixed: the launcher keys it once)
    consts: dict  # constexpr keyword arguments
    map_args: Optional[list]  # None: read from the masks per call
    interpret: bool
    fitted: bool = False
    launchers: dict = dataclasses.field(default_factory=dict)  # by config: see kernels/launcher.py

    def launcher(self, cfg: ForwardConfig) -> Launcher:
        found = self.launchers.get(cfg)
        if found is None:
            found = self.launchers[cfg] = Launcher(self.kernel, self.consts, cfg.num_warps, cfg.num_stages,
                                                   direct=not self.interpret)
        return found


_plans = PlanCache()


def _make_plan(call: AttentionCall, config: Optional[ForwardConfig], config_for: Optional[ConfigProvider]) -> _Plan:
    spec = KernelSpec.for_call(call)
    q, k, v = call.q, call.k, call.v
    B, Hq, M, N = call.batch, call.q_heads, call.q_len, call.kv_len
    cfg = choose(ConfigQuery("fwd", spec, q.dtype, B, Hq, call.kv_heads, M, N, q.device, call=call,
                             autotune=call.run.autotune), config, config_for)
    interpret = q.device.type != "cuda"
    map_args = signature_map_args(call, spec, cfg)
    # The output is allocated in the op's layout (fusepass.call.out_tensor): its strides are known now.
    tail = (*q.stride(), *k.stride(), *v.stride(), *out_strides(B, Hq, M, call.v_head_dim), Hq, call.groups, M, N,
            *scalar_args(spec, call.scale, call.softcap, call.dropout_p, call.mask_fill, N))
    consts = dict(head_dims(spec), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N)
    return _Plan(spec, cfg, kernel_module(spec, interpret).attn_fwd, grid(M, B, Hq, cfg), tail, consts,
                 map_args, interpret)


def signature_map_args(call: AttentionCall, spec: KernelSpec, cfg: ForwardConfig) -> Optional[list]:
    """The forward kernels' block-map arguments when the call's signature decides them (none,
    or a predicate's tile lists), else None: bool masks' are read from their contents per call
    (``data_map_args``).  Shared with the sm_90 forward, which walks tiles the same way."""
    if not spec.block_map:
        return list(blockmap.NO_MAP_ARGS)
    if call.masks:
        return None
    return blockmap.call_lists(call.mask_expr, call.mask_args, (), call.batch, call.q_heads, call.q_len,
                               call.kv_len, cfg.BLOCK_M, cfg.BLOCK_N, call.q.device, by="row").kernel_args()


def data_map_args(call: AttentionCall, cfg: ForwardConfig) -> list:
    """The block-map arguments of a call with bool masks, from the masks' tile classes (kept, at
    a granularity the backward's tiles are unions of, for the backward of this call)."""
    g = blockmap.granule(cfg.BLOCK_M, cfg.BLOCK_N)
    base = blockmap.data_classes(call.masks, call.q_len, call.kv_len, g, g, store=True)
    data = blockmap.coarsen(base, cfg.BLOCK_M // g, cfg.BLOCK_N // g)
    return blockmap.call_lists(call.mask_expr, call.mask_args, call.masks, call.batch, call.q_heads, call.q_len,
                               call.kv_len, cfg.BLOCK_M, cfg.BLOCK_N, call.q.device, by="row", data=data).kernel_args()


def attention_forward(call: AttentionCall, config: Optional[ForwardConfig] = None,
                      config_for: Optional[ConfigProvider] = None, *, scales: tuple = (),
                      out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """out [B, Hq, M, Dv] (v's dtype, or ``out_dtype``), lse [B, Hq, M] fp32; the op's semantics
    exactly.  ``scales``: an fp8 call's (q per row, k per key, v per channel: kernels/fp8.py)."""
    q, v = call.q, call.v
    B, Hq, M = call.batch, call.q_heads, call.q_len
    if call.empty:
        # Nothing to launch.  No keys: eager's softmax over zero keys is an empty row, P @ V a
        # sum of nothing (zeros) and logsumexp -inf.
        return (out_tensor(torch.zeros, B, Hq, M, call.v_head_dim, dtype=out_dtype or v.dtype, device=q.device),
                torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device))
    plan = _plans.get(plan_key(call, call.signature, config, config_for),
                      lambda: _make_plan(call, config, config_for))
    out = out_tensor(new_output, B, Hq, M, call.v_head_dim, dtype=out_dtype or v.dtype, device=q.device)
    lse = new_output((B, Hq, M), torch.float32, q.device)
    map_args = plan.map_args if plan.map_args is not None else data_map_args(call, plan.cfg)
    seed = seed_tensor(call.seed, q.device) if plan.spec.dropout else None
    extras = extra_args(call.biases, call.masks, call.mask_args)

    launches["fwd"] += 1
    if plan.fitted and not plan.interpret:  # the hot path: one lookup and the launch
        plan.launcher(plan.cfg)(plan.grid, q, call.k, v, out, lse, seed, *scales, *map_args, *extras, tail=plan.tail)
        return out, lse

    def launch(cfg: ForwardConfig) -> None:
        plan.launcher(cfg)(plan.grid, q, call.k, v, out, lse, seed, *scales, *map_args, *extras, tail=plan.tail)

    with render.interpreting() if plan.interpret else contextlib.nullcontext():
        if plan.fitted:
            launch(plan.cfg)
        else:
            plan.cfg, plan.fitted = launch_fitting(("fwd", plan.spec), plan.cfg, launch), True
    return out, lse


def runner(call: AttentionCall, config_for: Optional[ConfigProvider] = None) -> Optional[Callable]:
    """What a later call of ``call``'s signature needs beyond its tensors, bound once: a function
    of (q, k, v, biases, masks, seed) that allocates the outputs and launches.  None when such a
    call needs more per call (bool masks: their block map; the interpreter; no launch yet)."""
    if call.empty:
        return None
    plan = _plans.get(plan_key(call, call.signature, None, config_for), lambda: _make_plan(call, None, config_for))
    return bind_plan(call, plan, "fa2", (launches,))


def bind_plan(call: AttentionCall, plan, family: str, counters: tuple, admits: Optional[Callable] = None,
              before_launch: Optional[Callable] = None) -> Optional[Callable]:
    """A forward plan's runner (see ``runner``), shared by the families whose plans have this
    module's fields: ``counters`` gain one "fwd" per launch; ``admits(q, k, v)`` False makes a
    call return None (the caller takes the full path); ``before_launch`` runs before each.  The
    runner's ``family`` attribute names the kernel family it launches."""
    if not plan.fitted or plan.interpret or plan.map_args is None:
        return None
    out_shape, lse_shape = (call.batch, call.q_heads, call.q_len, call.v_head_dim), (call.batch, call.q_heads, call.q_len)
    dtype, device, mask_args, dropout = call.v.dtype, call.q.device, call.mask_args, plan.spec.dropout
    launch, grid, map_args, tail = plan.launcher(plan.cfg), plan.grid, plan.map_args, plan.tail

    def run(q, k, v, biases, masks, seed):
        if admits is not None and not admits(q, k, v):
            return None
        out = out_tensor(new_output, *out_shape, dtype=dtype, device=device)
        lse = new_output(lse_shape, torch.float32, device)
        extras = extra_args(biases, masks, mask_args) if biases or masks or mask_args else ()
        for counter in counters:
            counter["fwd"] += 1
        if before_launch is not None:
            before_launch()
        launch(grid, q, k, v, out, lse, seed_tensor(seed, device) if dropout else None, *map_args, *extras, tail=tail)
        return out, lse

    run.family = family
    return run
