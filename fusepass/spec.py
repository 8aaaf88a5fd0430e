"""What the matcher found at one attention site, and what became of it."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """An attention site described in the op's vocabulary (see fusepass/ops/attention.py)."""

    layout: str  # "[B, H, N, D]", "[B*H, N, D]" or "[N, D]": the rank the user wrote it in
    q_shape: tuple  # as the op sees it: [B, Hq, M, D] (entries may be symbolic)
    k_shape: tuple  # [B, Hkv, N, D]
    v_shape: tuple  # [B, Hkv, N, Dv]
    dtype: str
    device: str
    scale: float
    softcap: float  # 0.0 = none
    dropout_p: float  # 0.0 = none (also when the dropout is in eval mode)
    gqa_groups: object  # query heads per kv head (1 = plain multi-head); its expression (str) when symbolic
    gqa_source: str  # how the user repeated K/V: "", "repeat_kv", "repeat_interleave", "broadcast"
    bias_shapes: tuple  # one shape per additive bias
    bias_requires_grad: tuple  # per bias
    mask: str  # "none", "tensor", or the predicate text
    mask_fill: float  # what masked scores are replaced by (-inf or eager's finite value)
    skipped_fraction: float = 0.0  # fraction of 128x128 tiles the mask predicate rules out

    @property
    def bias(self) -> str:
        if not self.bias_shapes:
            return "none"
        parts = []
        for shape, grad in zip(self.bias_shapes, self.bias_requires_grad):
            parts.append("[" + ",".join(str(s) for s in shape) + "]" + (" (grad)" if grad else ""))
        return " + ".join(parts)

    @property
    def gqa(self) -> str:
        if self.gqa_groups == 1 and not self.gqa_source:
            return "none"
        return f"{self.gqa_groups} q/kv ({self.gqa_source or 'native'})"


@dataclasses.dataclass(frozen=True)
class SiteRecord:
    """One attention-like site in one compiled graph, for explain and the log."""

    location: str  # file:line of the softmax in the user's source
    fused: bool
    reason: Optional[str]  # why it was not fused, or None
    spec: Optional[AttentionSpec] = None  # None when refused before it could be described
    runs_on: str = ""  # "triton, <kernel family>", or "reference (<why>)", once fused
    module: str = ""  # the module that holds the site, e.g. "model.layers.3.self_attn" ("" at top level)

    @property
    def site(self) -> str:
        """How explain's table names the site: its module path, else its source location."""
        return self.module or self.location

    @property
    def runs_on_short(self) -> str:
        """``runs_on`` in a word or two: "triton prefill", "triton decode", "triton" (the family
        is chosen per call) or "reference" (``runs_on`` says why)."""
        if not self.runs_on.startswith("triton"):
            return self.runs_on.split(" (", 1)[0]
        family = self.runs_on.split(", ", 1)[-1]
        if "chosen per call" in family:
            return "triton"
        fp8 = " (fp8 guarded)" if "fp8 e4m3" in family else ""
        for name in ("prefill", "decode"):
            if family.startswith(name):
                return f"triton {name}{fp8}"
        return f"triton{fp8}"

    def __getattr__(self, name):
        # site.scale, site.mask, ... read through to the spec (None when there is none).
        if name.startswith("_") or name in ("spec",):
            raise AttributeError(name)
        spec = object.__getattribute__(self, "spec")
        if spec is None:
            return None
        return getattr(spec, name)
