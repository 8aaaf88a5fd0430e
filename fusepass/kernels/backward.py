"""Backward launcher: templates/attention_bwd.py.jinja -> three or four kernels -> ``attention_backward``.

Grids: ``attn_bwd_pre`` one program per (BLOCK_M query rows, b*Hq + h) (Delta, and the flags of
rows whose every score is -inf); with biases ``attn_bwd_rowstats``, like ``attn_bwd_dq``, one
program per (BLOCK_OWN query rows, b*Hq + h) (the row statistics that replace a too coarse
fp32 lse: see the template); ``attn_bwd_dkdv`` one program per (BLOCK_OWN keys, b*Hkv + hkv),
looping over the G query heads of the group and their query tiles in steps of BLOCK_STEP
(GQA: K/V read once, dK/dV summed in registers; no atomics); ``attn_bwd_dq`` one program per
(BLOCK_OWN query rows, b*Hq + h) stepping over key tiles of BLOCK_STEP (dQ in a separate
pass: deterministic, no atomics).  In the templates BLOCK_M always tiles queries and BLOCK_N
keys.

As in the forward, a launch is planned once per call signature (``forward._Plan``).  The plan
and launch machinery (``make_plan``, ``run_plan``) also serves the sm_90 backward
(``kernels/sm90.py``: the same template rendered with ``tma=True``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from fusepass.autotune.config import BackwardConfig
from fusepass.call import BackwardCall

from . import blockmap, render
from .heuristics import ConfigProvider, ConfigQuery, choose
from .launcher import Launcher
from .launch_common import (PlanCache, cdiv, extra_args, head_dims, launch_fitting, launches, new_like,
                            new_output, plan_key, scalar_args, seed_tensor, spec_module, strides4)
from .spec import KernelSpec, padded_head_dim

log = logging.getLogger(__name__)

_PRE_BLOCK_M = 64


def kernel_module(spec: KernelSpec, interpret: bool):
    return spec_module("attention_bwd.py.jinja", spec, interpret)


@dataclasses.dataclass
class _Plan:
    spec: KernelSpec
    cfg: BackwardConfig  # fitted per kernel once its first launch ran (see ``fitted``)
    mod: object  # the rendered module
    tail: tuple  # sizes and scalars common to every kernel (fixed: the launchers key it once)
    by_col: Optional[list]  # dK/dV block-map arguments; None: read from the masks per call
    by_row: Optional[list]  # dQ's
    interpret: bool
    consts: dict  # constexprs every kernel but attn_bwd_pre takes (besides its tiles)
    pre_consts: dict  # attn_bwd_pre's
    fitted: dict = dataclasses.field(default_factory=dict)  # kernel name -> fitted config
    launchers: dict = dataclasses.field(default_factory=dict)  # (kernel name, config): see kernels/launcher.py
    family: str = ""  # suffix of the kernels' launch_fitting keys ("_sm90" for the TMA variant)
    runs: dict = dataclasses.field(default_factory=dict)  # strides function -> _launches' function

    def launcher(self, name: str, cfg: Optional[BackwardConfig] = None) -> Launcher:
        """Kernel ``name``'s launcher under ``cfg`` (None for attn_bwd_pre, which has no config)."""
        found = self.launchers.get((name, cfg))
        if found is None:
            kernel = getattr(self.mod, name)
            if cfg is None:
                found = Launcher(kernel, self.pre_consts, direct=not self.interpret)
            else:
                found = Launcher(kernel, {**self.consts, **_tiles(name, cfg)}, cfg.num_warps, cfg.num_stages,
                                 direct=not self.interpret)
            self.launchers[(name, cfg)] = found
        return found


_plans = PlanCache()


def _make_plan(bcall: BackwardCall, config: Optional[BackwardConfig], config_for: Optional[ConfigProvider]) -> _Plan:
    call = bcall.forward
    q = call.q
    spec = KernelSpec.for_call(call, bias_needs_grad=bcall.bias_needs_grad)
    B, Hq, M, N = call.batch, call.q_heads, call.q_len, call.kv_len
    cfg = choose(ConfigQuery("bwd", spec, q.dtype, B, Hq, call.kv_heads, M, N, q.device, call=call,
                             autotune=call.run.autotune), config, config_for)
    return make_plan(bcall, spec, cfg, kernel_module)


def make_plan(bcall: BackwardCall, spec: KernelSpec, cfg: BackwardConfig, module, family: str = "") -> _Plan:
    """The plan of ``bcall`` under ``cfg``, its kernels from ``module(spec, interpret)``."""
    call = bcall.forward
    q = call.q
    B, Hq, M, N = call.batch, call.q_heads, call.q_len, call.kv_len
    by_col = by_row = list(blockmap.NO_MAP_ARGS)
    if spec.block_map:
        by_col = by_row = None
        if not call.masks:
            # dK/dV: tiles of BLOCK_STEP queries x BLOCK_OWN keys, per key tile; dQ: BLOCK_OWN x
            # BLOCK_STEP, per query tile.
            by_col = blockmap.call_lists(call.mask_expr, call.mask_args, (), B, Hq, M, N, cfg.BLOCK_STEP,
                                         cfg.BLOCK_OWN, q.device, by="col").kernel_args()
            by_row = blockmap.call_lists(call.mask_expr, call.mask_args, (), B, Hq, M, N, cfg.BLOCK_OWN,
                                         cfg.BLOCK_STEP, q.device, by="row").kernel_args()
    tail = (Hq, call.groups, M, N, *scalar_args(spec, call.scale, call.softcap, call.dropout_p, call.mask_fill, N))
    interpret = q.device.type != "cuda"
    pre_consts = dict(HEAD_DIM_V=call.v_head_dim, HEAD_DIM_V_P=padded_head_dim(call.v_head_dim), BLOCK_M=_PRE_BLOCK_M)
    return _Plan(spec, cfg, module(spec, interpret), tail, by_col, by_row, interpret, head_dims(spec),
                 pre_consts, family=family)


def _data_map_args(call, cfg: BackwardConfig) -> tuple[list, list]:
    # The masks' classes come from this call's forward when it kept them.
    M, N = call.q_len, call.kv_len
    data_kv = blockmap.data_classes(call.masks, M, N, cfg.BLOCK_STEP, cfg.BLOCK_OWN)
    data_q = blockmap.data_classes(call.masks, M, N, cfg.BLOCK_OWN, cfg.BLOCK_STEP)
    lists = (blockmap.call_lists(call.mask_expr, call.mask_args, call.masks, call.batch, call.q_heads, M, N,
                                 bm, bn, call.q.device, by=by, data=data)
             for bm, bn, by, data in ((cfg.BLOCK_STEP, cfg.BLOCK_OWN, "col", data_kv),
                                      (cfg.BLOCK_OWN, cfg.BLOCK_STEP, "row", data_q)))
    return tuple(t.kernel_args() for t in lists)


def _bias_grads(biases, spec: KernelSpec):
    """Per bias its gradient buffer (empty when not wanted), the kernels' arguments for them,
    and the fp32 accumulators to cast back at the end."""
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
    return dbiases, db_args, finish


def attention_backward(bcall: BackwardCall, config: Optional[BackwardConfig] = None,
                       config_for: Optional[ConfigProvider] = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """dq, dk, dv (shapes and dtypes of q, k, v) and one gradient per bias (empty if not needed)."""
    call = bcall.forward
    if call.empty:
        return empty_grads(bcall)
    plan = _plans.get(plan_key(call, bcall.signature, config, config_for),
                      lambda: _make_plan(bcall, config, config_for))
    return run_plan(plan, bcall)


def empty_grads(bcall: BackwardCall) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The gradients of a call with no keys or no queries: nothing to launch, no score exists,
    so every gradient is a sum of nothing (zeros)."""
    call = bcall.forward
    dbiases = [torch.zeros(b.shape, dtype=b.dtype, device=b.device) if need else b.new_empty((0,))
               for b, need in zip(call.biases, bcall.bias_needs_grad)]
    return torch.zeros_like(call.q), torch.zeros_like(call.k), torch.zeros_like(call.v), dbiases


def run_plan(plan: _Plan, bcall: BackwardCall, strides=Tensor.stride) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Launch ``plan``'s kernels for ``bcall`` (not empty); ``strides`` gives the strides the
    kernels get for q, k, v, grad_out and out (the sm_90 variant's descriptors want those of
    size-1 dims replaced: ``sm90._tma_strides``)."""
    call = bcall.forward
    by_col, by_row = plan.by_col, plan.by_row
    if by_col is None:
        by_col, by_row = _data_map_args(call, plan.cfg)
    run = _bound_launches(plan, bcall, strides)
    return run(bcall.grad_out, call.q, call.k, call.v, bcall.out, bcall.lse, call.biases, call.masks, call.seed,
               by_col, by_row)


def bind_plan(plan: _Plan, bcall: BackwardCall, strides=Tensor.stride, counters: tuple = (),
              admits: Optional[Callable] = None, before_launch: Optional[Callable] = None) -> Optional[Callable]:
    """A backward runner: a function of (grad_out, q, k, v, out, lse, biases, masks, seed) for
    later calls of ``bcall``'s signature, returning (dq, dk, dv, bias grads) as ``run_plan``
    does.  None while a call needs more than its tensors: block maps read from the masks, or a
    kernel whose config has not been fitted by a first launch.  ``counters`` gain one "bwd" a
    call; ``admits(grad_out, q, k, v, out)`` False makes a call return None (the caller takes
    the full path); ``before_launch`` runs before each call's launches."""
    if plan.by_col is None or not all(name in plan.fitted for name in _fitted_kernels(plan.spec)):
        return None
    launch, by_col, by_row = _bound_launches(plan, bcall, strides), plan.by_col, plan.by_row

    def checked(grad_out, q, k, v, out, lse, biases, masks, seed):
        if admits is not None and not admits(grad_out, q, k, v, out):
            return None
        for counter in counters:
            counter["bwd"] += 1
        if before_launch is not None:
            before_launch()
        return launch(grad_out, q, k, v, out, lse, biases, masks, seed, by_col, by_row)

    return checked


def runner(bcall: BackwardCall, config_for: Optional[ConfigProvider] = None) -> Optional[Callable]:
    """The FA2 backward's runner for ``bcall``'s signature (``bind_plan``), None for an empty call."""
    call = bcall.forward
    if call.empty:
        return None
    plan = _plans.get(plan_key(call, bcall.signature, None, config_for), lambda: _make_plan(bcall, None, config_for))
    return bind_plan(plan, bcall)


def _fitted_kernels(spec: KernelSpec) -> tuple[str, ...]:
    """The kernels with a fitted config (all but attn_bwd_pre): the ones a plan launches."""
    return ("attn_bwd_rowstats",) * bool(spec.natural_units) + ("attn_bwd_dkdv", "attn_bwd_dq")


def _bound_launches(plan: _Plan, bcall: BackwardCall, strides) -> Callable:
    """``_launches`` of ``plan`` under ``strides``, made once per plan."""
    run = plan.runs.get(strides)
    if run is None:
        run = plan.runs[strides] = _launches(plan, bcall, strides)
    return run


def _launches(plan: _Plan, bcall: BackwardCall, strides) -> Callable:
    """``plan``'s launches for calls of ``bcall``'s signature, as a function of (grad_out, q, k,
    v, out, lse, biases, masks, seed, by_col, by_row) -> (dq, dk, dv, bias grads), ``by_col`` and
    ``by_row`` the block-map arguments of dK/dV and dQ.  What the signature fixes
    (sizes, the strides the kernels get, grids, the pre kernel's launcher) is read here once."""
    call = bcall.forward
    spec, tail = plan.spec, plan.tail
    B, Hq, Hkv, M, N, groups = call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len, call.groups
    device, mask_args, natural, dropout = call.q.device, call.mask_args, spec.natural_units, spec.dropout
    st_q, st_k, st_v, st_do, st_o = (tuple(strides(t)) for t in (call.q, call.k, call.v, bcall.grad_out, bcall.out))
    # The gradients' strides, as new_like will make them (empty_like's rule, read on meta).
    st_dq, st_dk, st_dv = (torch.empty_like(t, device="meta").stride() for t in (call.q, call.k, call.v))
    # Each kernel's fixed tail: its strides, then the plan's sizes and scalars.  The signature
    # fixes all of them, so a launcher keys each tail once (kernels/launcher.py), not per call.
    tails = {"attn_bwd_pre": (*st_o, *st_do, Hq, groups, M),
             "attn_bwd_rowstats": (*st_q, *st_k, *tail),
             "attn_bwd_dkdv": (*st_q, *st_k, *st_v, *st_do, *st_dk, *st_dv, *tail),
             "attn_bwd_dq": (*st_q, *st_k, *st_v, *st_do, *st_dq, *tail)}
    pre, pre_grid = plan.launcher("attn_bwd_pre"), (cdiv(M, _PRE_BLOCK_M), B * Hq)
    context = render.interpreting if plan.interpret else contextlib.nullcontext
    rows_grid = lambda c: (cdiv(M, c.BLOCK_OWN), B * Hq)  # noqa: E731  (dQ and the row statistics)
    keys_grid = lambda c: (cdiv(N, c.BLOCK_OWN), B * Hkv)  # noqa: E731  (dK/dV)

    def launch(name: str, grid_of, args: tuple) -> None:
        kernel_tail = tails[name]

        def run(c: BackwardConfig) -> None:
            plan.launcher(name, c)(grid_of(c), *args, tail=kernel_tail)
        launches[name.removeprefix("attn_bwd_")] += 1
        fitted = plan.fitted.get(name)
        if fitted is not None:
            run(fitted)
        else:
            plan.fitted[name] = launch_fitting((name + plan.family, spec), plan.cfg, run)

    def run(grad_out, q, k, v, out, lse, biases, masks, seed, by_col, by_row):
        dq, dk, dv = new_like(q), new_like(k), new_like(v)
        dbiases, db_args, finish = _bias_grads(biases, spec)
        delta = new_output((B, Hq, M), torch.float32, device)
        # Per (batch, kv head): 1 when a row of its group has every score -inf (attn_bwd_pre).
        nan_rows = torch.zeros((B * Hkv,), dtype=torch.int32, device=device)
        shift = rinv = None
        if natural:
            shift = new_output((B, Hq, M), torch.float32, device)
            rinv = new_output((B, Hq, M), torch.float32, device)
        seed_t = seed_tensor(seed, device) if dropout else None
        extras = extra_args(biases, masks, mask_args)
        with context():
            pre(pre_grid, out, grad_out, lse, delta, nan_rows, tail=tails["attn_bwd_pre"])
            if natural:
                # Tiles shaped like attn_bwd_dq's (which fit whenever dq's do); only query tiles
                # holding a row with a coarse lse loop over the keys.
                launch("attn_bwd_rowstats", rows_grid, (q, k, lse, shift, rinv, *extras))
            launch("attn_bwd_dkdv", keys_grid, (
                q, k, v, grad_out, lse, delta, shift, rinv, nan_rows, dk, dv, seed_t, *by_col, *extras, *db_args))
            launch("attn_bwd_dq", rows_grid, (
                q, k, v, grad_out, lse, delta, shift, rinv, dq, seed_t, *by_row, *extras))
        for i, dtype in finish:
            dbiases[i] = dbiases[i].to(dtype)
        return dq, dk, dv, dbiases

    return run


def _tiles(kernel: str, c: BackwardConfig) -> dict:
    """The templates' BLOCK_M (queries) and BLOCK_N (keys) of one backward kernel."""
    if kernel == "attn_bwd_dkdv":
        return dict(BLOCK_M=c.BLOCK_STEP, BLOCK_N=c.BLOCK_OWN)
    return dict(BLOCK_M=c.BLOCK_OWN, BLOCK_N=c.BLOCK_STEP)  # dQ and the row statistics own query rows
