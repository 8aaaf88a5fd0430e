"""The ``fusepass`` torch.compile backend: rewrite attention, hand the rest to the inner compiler."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .autotune import provider
from .graph import matcher, rewrite
from .graph.contractions import Refusal
from .options import Options, resolve_options
from .spec import SiteRecord

log = logging.getLogger(__name__)

# explain() installs a list here to collect the records of the graphs it compiles.
_recorders: list[list[SiteRecord]] = []


def source_location(node: fx.Node) -> str:
    """file:line of the innermost user frame that produced ``node``."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return f"<graph>:{node.name}"
    path, line = frames[-1]
    return f"{os.path.basename(path)}:{line}"


def fuse_attention(gm: fx.GraphModule, options: Options) -> list[SiteRecord]:
    """Rewrite every fusable attention in ``gm`` in place; one record per attention-like site."""
    records = []
    for softmax, found in matcher.find_sites(gm):
        location = source_location(softmax)
        if isinstance(found, Refusal):
            records.append(SiteRecord(location, False, str(found)))
            continue
        try:
            expand = rewrite.check_batch(found)
            spec = rewrite.describe(found, location)
        except Refusal as refusal:
            records.append(SiteRecord(location, False, str(refusal)))
            continue
        reason = _policy_refusal(spec, options)
        if reason is not None:
            records.append(SiteRecord(location, False, reason, spec))
            continue
        rewrite.rewrite(gm, found, expand)
        records.append(SiteRecord(location, True, None, spec, runs_on=_runs_on(spec)))
    if any(r.fused for r in records):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    for r in records:
        if r.fused:
            counters["fusepass"]["attention_fused"] += 1
            log.info("fused attention at %s: %s", r.location, r.spec)
        else:
            counters["fusepass"]["attention_rejected"] += 1
            log.debug("not fusing attention at %s: %s", r.location, r.reason)
    return records


def _policy_refusal(spec, options: Options) -> Optional[str]:
    if not options.fuse:
        return "fusion is turned off (option fuse=False)"
    n = spec.k_shape[2]
    if isinstance(n, int) and n < options.min_seq_len:
        return f"key length {n} is below min_seq_len={options.min_seq_len}"
    return None


def _runs_on(spec) -> str:
    """Where the op will run for this site, as far as is known at compile time."""
    try:
        from .kernels import support
    except ImportError:
        return "reference"
    reason = support.fallback_reason(spec.device, spec.dtype, spec.q_shape[3], spec.v_shape[3])
    return "triton" if reason is None else f"reference ({reason})"


def _inner_compile(gm: fx.GraphModule, example_inputs, options: Options, mode: Optional[str]) -> Callable:
    if options.inner == "eager":
        return gm.forward
    if options.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def fusepass_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Optional[dict] = None,
    mode: Optional[str] = None,
) -> Callable:
    """``torch.compile(model, backend="fusepass", options={...})``."""
    opts = resolve_options(options)
    # Kernel launches get their configs from the autotuner; the op carries no options, so the
    # autotune switch of the latest compile applies process-wide (see docs/autotune.md).
    provider.install()
    provider.configure(opts)
    records = fuse_attention(gm, opts)
    for recorder in _recorders:
        recorder.extend(records)
    return _inner_compile(gm, example_inputs, opts, mode)
