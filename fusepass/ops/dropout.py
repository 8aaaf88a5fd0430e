"""Counter-based dropout keep-mask shared by every implementation of the op.

The keep decision for score (b, h, i, j) is a pure function of (seed, row, j), where
row = (b * Hq + h) * M + i.  The chunked reference and the Triton kernels compute the same
hash, so forward and backward (and CPU and GPU) regenerate the identical mask without storing it.
Only 32-bit multiplies by constants below 2**31 are used so that int64 arithmetic in
PyTorch never overflows and Triton's uint32 arithmetic gives the same bits.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL_A = 0x7FEB352D  # odd multipliers < 2**31 (see module docstring)
MUL_B = 0x31848BAB


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK32
    x = x ^ (x >> 16)
    return x


def keep_mask(seed: int, rows: torch.Tensor, cols: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Boolean keep mask for the outer product of ``rows`` [R, 1] and ``cols`` [1, C] (int64)."""
    threshold = int(dropout_p * 2**32)
    r = hash32((rows & MASK32) ^ (seed & MASK32))
    u = hash32(r ^ (cols & MASK32))
    return u >= threshold

