"""Which calls the kernels serve: one static check, used at compile time (explain) and at run time."""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from .limits import FINITE_FILL_LIMIT

SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=1)
def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def interpret_requested() -> bool:
    """The process default for CPU tensors (a compile's ``interpret`` option overrides it per call)."""
    return os.environ.get("FUSEPASS_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def fallback_reason(
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    v_head_dim: int,
    mask_fill: float = float("-inf"),
    *,
    interpret: Optional[bool] = None,
    capability: Optional[tuple[int, int]] = None,
    softcap: float = 0.0,
) -> Optional[str]:
    """None when the Triton kernels serve this case, else why the reference runs instead."""
    if interpret is None:
        interpret = interpret_requested()
    if _triton_version() is None:
        return "triton is not installed"
    if device_type == "cpu":
        if not interpret:
            return "CPU tensors (set FUSEPASS_INTERPRET=1 to run the kernels in Triton's interpreter)"
    elif device_type != "cuda":
        return f"device type {device_type!r} has no kernels"
    elif capability is not None and capability < (8, 0):
        return f"GPU compute capability {capability[0]}.{capability[1]} < 8.0"
    if dtype not in SERVED_DTYPES:
        return f"dtype {dtype} (kernels serve float16, bfloat16, float32)"
    if max(head_dim, v_head_dim) > MAX_HEAD_DIM:
        return f"head dim {max(head_dim, v_head_dim)} > {MAX_HEAD_DIM}"
    if not math.isinf(mask_fill) and mask_fill > FINITE_FILL_LIMIT:
        # The kernels treat masked scores as -inf on rows that see a key; that is exact only
        # when exp(fill - rowmax) underflows to 0.
        return f"finite mask_fill {mask_fill} > {FINITE_FILL_LIMIT:g}"
    if not math.isinf(mask_fill) and math.isnan(mask_fill):
        return "mask_fill is NaN"
    return None


def fp32_dot_precision() -> str:
    """tl.dot's input_precision for fp32 inputs: "tf32" when PyTorch lets CUDA fp32 matmuls use
    TF32, else "ieee".

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none":
    unset, which reads as the global ``torch.backends.fp32_precision``); it is the setting that
    Inductor reads, and once it has been set, reading the legacy ``allow_tf32`` raises
    ("mix of the legacy and new APIs").  Older torch has only ``allow_tf32``.  Feature-tested,
    never version-tested.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return "tf32" if matmul.allow_tf32 else "ieee"
    return "tf32" if precision == "tf32" else "ieee"
