"""Every "this value hides a key" threshold, in one place (plain numbers, no torch).

Three different questions, three limits:

- ``ADDITIVE_READ_AT_MOST``: may an additive value be *read* as a mask fill at all (the mask
  reader)?  Only -inf or values at least as negative as fp16's finfo.min; -1e4 (old BERT
  code) is a bias, since a row of all -1e4 softmaxes like the unmasked row.
- ``ADDITIVE_LIFT_AT_MOST``: may a read additive mask be *lifted* into a replacing predicate
  whatever the rows look like?  Only where s + fill == fill for every realistic score in
  fp32/bf16 (|s| far below 2**100): -inf or fp32/bf16's finfo.min.  fp16's finfo.min is read
  but not lifted that way: a fully masked fp16 row would softmax its scores.
- ``FINITE_FILL_LIMIT``: may a *replacing* fill (masked_fill / where) be treated as hidden by
  the kernels (exp(fill - rowmax) underflows to 0 on rows that see a key, and tiles are
  skipped)?  -1e4 as bfloat16 stores it (-9984), so that old code's -10000.0 qualifies on
  bf16 scores; the graph matcher refuses fills above it.
"""

from __future__ import annotations

ADDITIVE_READ_AT_MOST = -65504.0  # torch.finfo(torch.float16).min
ADDITIVE_LIFT_AT_MOST = -1e30
FINITE_FILL_LIMIT = -9984.0  # float(torch.tensor(-1e4, dtype=torch.bfloat16))
