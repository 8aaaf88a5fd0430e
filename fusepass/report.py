"""``fusepass.explain`` (this module is named apart from the function, so that importing it
cannot shadow ``fusepass.explain``): compile and run once, and report every attention-like site."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

import torch
from tabulate import tabulate

from . import backend
from .graph.nodes import format_scale
from .ops import fp8_guard
from .spec import SiteRecord


def dynamo_fallbacks() -> tuple[int, collections.Counter]:
    """Frames Dynamo ran eagerly so far in this process (it started them and gave up: a graph
    break in a loop, a generator, its recompile limit, ...), and Dynamo's reasons for graph
    breaks and skips (the first line of each, with counts).  Attention in such a frame is
    neither fused nor seen by fusepass, so counts of fused sites alone would mislead."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    reasons: collections.Counter = collections.Counter()
    for reason, n in counters["unimplemented"].items():
        reasons[reason.strip().splitlines()[0]] += n
    return frames["total"] - frames["ok"], reasons


@dataclasses.dataclass
class ExplainReport:
    sites: list[SiteRecord]
    graphs: int  # how many graphs Dynamo compiled
    eager_frames: int = 0  # frames Dynamo gave up on during the call (they ran eagerly)
    dynamo_reasons: dict = dataclasses.field(default_factory=dict)  # Dynamo's reasons during the call
    fp8: list = dataclasses.field(default_factory=list)  # the fp8 guard's decisions during the call

    @property
    def fused(self) -> int:
        return sum(s.fused for s in self.sites)

    def __str__(self) -> str:
        rows = []
        for s in self.sites:
            spec = s.spec
            rows.append([
                s.site,
                s.location if s.module else "",
                "yes" if s.fused else "no",
                spec.layout if spec else "",
                f"{spec.dtype} q{list(spec.q_shape)}" if spec else "",
                _kv(spec) if spec else "",
                format_scale(spec.scale) if spec else "",
                (spec.mask + (f" ({spec.skipped_fraction:.0%} tiles skipped)" if spec.skipped_fraction else "")) if spec else "",
                spec.bias if spec else "",
                spec.gqa if spec else "",
                (f"{spec.softcap:g}" if spec.softcap else "-") if spec else "",
                (f"{spec.dropout_p:g}" if spec.dropout_p else "-") if spec else "",
                s.runs_on_short if s.fused else s.reason,
            ])
        head = ["site", "source", "fused", "layout", "q", "k/v", "scale", "mask", "bias", "gqa", "softcap", "dropout",
                "runs on / why not"]
        table = tabulate(rows, headers=head, tablefmt="github") if rows else "(no attention found)"
        text = f"{table}\n{self.fused} of {len(self.sites)} attention sites fused in {self.graphs} graph(s)"
        # The long form of "runs on", once per distinct text: why the reference, which family.
        details = dict.fromkeys(s.runs_on for s in self.sites if s.fused and s.runs_on != s.runs_on_short)
        for detail in details:
            text += f"\nruns on {detail}"
        for d in self.fp8:
            text += (f"\nfp8 guard: {d.shape} {'runs e4m3' if d.use_fp8 else 'keeps its dtype'} (relative RMS "
                     f"error {d.error:.3g} against its dtype's kernel)")
        if self.eager_frames:
            why = "; ".join(f"{r} (x{n})" for r, n in self.dynamo_reasons.items()) or "no reason given"
            text += (f"\nwarning: Dynamo gave up on {self.eager_frames} frame(s) and ran them eagerly: attention "
                     "written directly in them is not fused and not listed above (functions they call are "
                     f"compiled on their own). Dynamo's reasons: {why}")
        return text


def _kv(spec) -> str:
    """k's shape, and v's where its head dim differs."""
    text = f"k{list(spec.k_shape)}"
    if spec.v_shape[-1] != spec.k_shape[-1]:
        text += f" v[..., {spec.v_shape[-1]}]"
    return text


def explain(model_or_fn, *args: Any, options: Optional[dict] = None, **kwargs: Any) -> ExplainReport:
    """Compile ``model_or_fn`` with fusepass, run it once on the arguments, and report.

    Runs under ``torch.no_grad()`` unless an input requires grad.  The compiled artifact is
    private to this call (its own backend instance), so the user's compiled models are
    untouched.
    """
    records: list[SiteRecord] = []
    graphs = 0

    def recording_backend(gm, example_inputs, **kw):
        nonlocal graphs
        graphs += 1
        return backend.fusepass_backend(gm, example_inputs, options=options, **kw)

    compiled = torch.compile(model_or_fn, backend=recording_backend)
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    wants_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)
    backend._recorders.append(records)
    eager_before, reasons_before = dynamo_fallbacks()
    fp8_before = fp8_guard.decisions()
    try:
        with torch.set_grad_enabled(wants_grad):
            compiled(*args, **kwargs)
    finally:
        backend._recorders.remove(records)
    eager_after, reasons_after = dynamo_fallbacks()
    fp8 = [d for key, d in fp8_guard.decisions().items() if key not in fp8_before]
    return ExplainReport(records, graphs, eager_after - eager_before, dict(reasons_after - reasons_before), fp8)
