"""Partial attention outputs merged exactly by their log-sum-exp.

Attention over keys K1 ∪ K2 from the attention over each part: with l = logaddexp(l1, l2),
out = out1 * exp(l1 - l) + out2 * exp(l2 - l).  A row that sees no key of a part has l = -inf
there (and the op's out is NaN): its weight is 0 and its out is ignored, never 0 * NaN.  A row
that sees no key at all ends with l = -inf and out NaN, what the op gives for such a row.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

_NEG_INF = float("-inf")


@dataclasses.dataclass
class Partial:
    """What is merged so far: out [B, H, M, Dv] in fp32 (fp64 for fp64), lse fp32 [B, H, M]."""

    out: Tensor
    lse: Tensor


def add(acc: Optional[Partial], out: Tensor, lse: Tensor) -> Partial:
    """``acc`` merged with one more part (out, lse) over other keys."""
    out = out.to(torch.float64 if out.dtype == torch.float64 else torch.float32)
    if acc is None:
        return Partial(out, lse)
    total = torch.logaddexp(acc.lse, lse)
    shift = torch.where(total == _NEG_INF, torch.zeros_like(total), total)  # rows that see nothing yet
    merged = _weighted(acc.out, acc.lse, shift) + _weighted(out, lse, shift)
    return Partial(merged, total)


def _weighted(out: Tensor, lse: Tensor, shift: Tensor) -> Tensor:
    w = torch.exp(lse - shift).unsqueeze(-1).to(out.dtype)  # 0 where the part saw no key
    return torch.where(w > 0, out * w, torch.zeros_like(out))


def finish(acc: Optional[Partial], shape: tuple, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """(out in ``dtype``, lse); ``acc`` None: no part ran (every pair hidden): NaN rows, lse -inf."""
    if acc is None:
        B, H, M, Dv = shape
        return (torch.full(shape, float("nan"), dtype=dtype, device=device),
                torch.full((B, H, M), _NEG_INF, dtype=torch.float32, device=device))
    hidden = (acc.lse == _NEG_INF).unsqueeze(-1)
    out = torch.where(hidden, torch.full_like(acc.out, float("nan")), acc.out)
    return out.to(dtype), acc.lse
