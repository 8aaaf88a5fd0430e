"""The per-site accuracy guard of the FP8 forward.

A site compiled with ``options={"fp8": True}`` does not trust FP8 blindly: the first call of
each call signature (a site's shape) runs both the e4m3 kernel and the kernel in the inputs' own
dtype on that call's inputs (the site's real scale and outliers), and measures the e4m3
output's relative RMS error against the other.  At most MAX_REL_RMS_ERROR, later calls of that
signature run e4m3; above it, they keep their dtype.  The first call returns the own-dtype
output either way.  Decisions are logged (INFO) and kept for ``fusepass.explain``.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional

from torch import Tensor

from fusepass.call import AttentionCall
from fusepass.kernels import fp8

log = logging.getLogger(__name__)

# NOTE: relative RMS error of the e4m3 output against bf16 under Triton's interpreter (CPU,
# e4m3 casts rounded exactly), H=2, D=64/128, M=N=48/200: N(0, 1) inputs 4.6-5.0%; q and k
# twice that scale 7.2-8.0%; four times (scores of std ~16: a 6% score error is a factor e in
# a probability) 14-15%; an outlier channel of q and k 50x the others (spread by the rotation)
# 3.1%; one key's value 1000x its channel's others 2.8%.  On the H200, FlashAttention-3's
# outlier inputs: 4.2-5.9% (benchmarks/RESULTS.md, 2026-12-03).
MAX_REL_RMS_ERROR = 0.1
_MAX_DECISIONS = 1024


class Decision(NamedTuple):
    use_fp8: bool
    error: float  # relative RMS error of the e4m3 output against the own-dtype one
    shape: str  # q / k / v shapes and dtype, for the log and explain


_decisions: dict = {}  # call signature -> Decision
_refused: set = set()  # signatures whose refusal was logged


def decisions() -> dict:
    """Every decision so far, by call signature (a copy)."""
    return dict(_decisions)


def forward(call: AttentionCall, own_dtype: Callable[[AttentionCall], tuple],
            config_for=None) -> Optional[tuple[Tensor, Tensor]]:
    """The fp8 run of ``call`` once its signature passed the guard, the own-dtype run on its first
    call (``own_dtype``: the prefill launch), None when fp8 does not serve it at all."""
    key = call.signature
    found = _decisions.get(key)
    if found is not None:
        return fp8.attention_forward(call, config_for) if found.use_fp8 else None
    reason = fp8.refusal(call)
    if reason is not None:
        if key not in _refused:
            _refused.add(key)
            log.debug("fusepass fp8: %s runs in %s: %s", _shape(call), call.q.dtype, reason)
        return None
    low, _ = fp8.attention_forward(call, config_for)
    result = own_dtype(call)
    ref = result[0].float()
    error = ((low.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    # NaN (a row with no visible key, as eager gives) is compared by position, not in the norm.
    if error != error:
        finite = ref.isfinite()
        same_nans = bool((low.float().isfinite() == finite).all())
        error = ((low.float()[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30)).item() \
            if same_nans else float("inf")
    decision = Decision(error <= MAX_REL_RMS_ERROR, error, _shape(call))
    if len(_decisions) >= _MAX_DECISIONS:
        _decisions.clear()
    _decisions[key] = decision
    log.info("fusepass fp8: %s %s (relative RMS error %.3g against %s; limit %.3g)", decision.shape,
             "runs e4m3" if decision.use_fp8 else f"stays {call.q.dtype}", error, call.q.dtype, MAX_REL_RMS_ERROR)
    return result


def _shape(call: AttentionCall) -> str:
    return (f"q{list(call.q.shape)} k{list(call.k.shape)} v{list(call.v.shape)} "
            f"{str(call.q.dtype).replace('torch.', '')}")
