"""Argument packing and launch plans shared by the forward and backward launchers."""

from __future__ import annotations

import collections
import math
import struct
import threading
from typing import Callable, TypeVar

import torch

from . import render
from .spec import KernelSpec, padded_head_dim, value_tile_dim


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


Plan = TypeVar("Plan")

# Kernel launches by kernel ("fwd", "rowstats", "dkdv", "dq"): what tests and the GPU fuzzer
# read to know that the Triton kernels really ran (a counter increment per launch).
launches: collections.Counter = collections.Counter()


def forward_launches() -> int:
    """Forward launches of either family (prefill "fwd", decode "decode") so far."""
    return launches["fwd"] + launches["decode"]


class PlanCache:
    """Launch plans by key, the oldest dropped past ``size`` (dynamic lengths make
    a new key per length)."""

    def __init__(self, size: int = 512) -> None:
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key, make: Callable[[], Plan]) -> Plan:
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = make()
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


def plan_key(call, sig: tuple, *extra) -> tuple:
    """A plan key: the call's signature ``sig``, what the launcher was given (``extra``) and, for
    fp32, the TF32 setting the kernel spec reads (a process setting that may change between calls)."""
    if call.q.dtype == torch.float32:
        from .support import fp32_dot_precision

        return (sig, fp32_dot_precision(), *extra)
    return (sig, *extra)


_modules: dict = {}


def spec_module(template: str, spec: KernelSpec, interpret: bool):
    """The rendered kernel module of ``template`` for ``spec``.

    A per-spec memo in front of render.load: printing the predicate and hashing the render
    parameters on every launch would cost host time on the hot path.
    """
    mod = _modules.get((template, spec, interpret))
    if mod is None:
        mod = _modules[(template, spec, interpret)] = render.load(template, spec.render_params(), interpret=interpret)
    return mod


# Testing hook: fill every output buffer with NaN before the kernels run, so that an element a
# kernel forgets to write shows up (tests/test_kernels.py turns it on).
poison_outputs = False


def new_output(shape, dtype, device) -> torch.Tensor:
    if poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    if poison_outputs:
        out.fill_(float("nan"))
    return out


def strides4(t: torch.Tensor, target_dims: int = 4) -> list[int]:
    """Strides of ``t`` seen as [B, H, M, N] (missing leading dims and size-1 dims: stride 0)."""
    shape = (1,) * (target_dims - t.dim()) + tuple(t.shape)
    stride = (0,) * (target_dims - t.dim()) + tuple(t.stride())
    return [0 if s == 1 else st for s, st in zip(shape, stride)]


def extra_args(biases, masks, mask_args) -> list:
    out: list = []
    for b in biases:
        out += [b, *strides4(b)]
    for m in masks:
        # Triton has no bool pointer loads everywhere: read the same bytes as uint8.
        out += [m.view(torch.uint8), *strides4(m)]
    out += [int(a) for a in mask_args]
    return out


def seed_tensor(seed, device) -> torch.Tensor | None:
    if seed is None:
        return None
    if seed.device == device:
        return seed.reshape(1)
    # A CPU seed: reading it syncs nothing; torch.full on the device needs no H2D copy.
    return torch.full((1,), int(seed.item()), dtype=torch.int64, device=device)


def _f32(x: float) -> float:
    """``x`` rounded to fp32 (numpy is not a dependency; struct does it without torch)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def scalar_args(spec: KernelSpec, scale, softcap, dropout_p, mask_fill, N) -> list:
    """The kernels' scalar tail: sm_scale, scale_log2e, softcap, inv_softcap, drop_threshold,
    drop_scale, fill_lse, fill (the same order in every kernel's signature)."""
    log2e = 1.4426950408889634
    threshold = int(dropout_p * 2**32) if dropout_p > 0 else 0
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    fill_lse = 0.0
    if spec.finite_fill:
        # logsumexp of N equal fills, rounded like torch's fp32 logsumexp: fill + log(N) (the
        # double sum of two fp32 values, rounded once, is their fp32 sum).
        fill_lse = _f32(_f32(mask_fill) + _f32(math.log(max(N, 1))))
    # The fill itself, rounded to fp32 (the kernels compare fp32 scores with it); -inf for none.
    fill = _f32(mask_fill) if spec.finite_fill else float("-inf")
    return [
        float(scale), float(scale) * log2e, float(softcap), 1.0 / softcap if softcap > 0 else 0.0,
        threshold, drop_scale, fill_lse, fill,
    ]


def head_dims(spec: KernelSpec) -> dict:
    return dict(
        HEAD_DIM=spec.head_dim,
        HEAD_DIM_V=spec.v_head_dim,
        HEAD_DIM_P=padded_head_dim(spec.head_dim),
        HEAD_DIM_V_P=value_tile_dim(spec.head_dim, spec.v_head_dim),
    )


_fitted: dict = {}


def launch_fitting(key, cfg, launch):
    """``launch(cfg)``; if the compiled kernel needs more shared memory than the GPU has (e.g.
    extra bias/mask tiles on top of a tuned config), retry with fewer pipeline stages and
    remember the config that fitted.  Only the first launch of a variant can take this path,
    so CUDA-graph replays never do."""
    import dataclasses

    cfg = _fitted.get((key, cfg), cfg)
    first = cfg
    while True:
        try:
            launch(cfg)
        except Exception as e:  # triton.runtime.errors.OutOfResources (its module moved between versions)
            if type(e).__name__ != "OutOfResources" or cfg.num_stages <= 1:
                raise
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
            continue
        _fitted[(key, first)] = cfg
        return cfg
