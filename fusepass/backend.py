"""The ``fusepass`` torch.compile backend: rewrite attention, hand the rest to the inner compiler."""

from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from . import compile_cache, logs
from .kernels import fp8, support
from .graph import matcher, mutations, nodes, predicates, rewrite
from .graph.contractions import Refusal
from .masks.reader import Guard
from .options import Options, resolve_options
from .spec import SiteRecord

log = logging.getLogger(__name__)
logs.configure()

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


def module_path(node: fx.Node) -> str:
    """The path of the innermost module whose forward produced ``node``, as ``named_modules``
    spells it ("model.layers.3.self_attn"); "" for code outside any submodule."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo's spelling of the source: L['self'].layers[3]._modules['attn'] or L['args'][0].model...
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])*\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def _where(r: SiteRecord) -> str:
    return f"{r.module} ({r.location})" if r.module else r.location


def fuse_attention(
    gm: fx.GraphModule, options: Options, example_inputs: Optional[list] = None
) -> tuple[list[SiteRecord], list[Guard], Optional[fx.GraphModule]]:
    """Rewrite every fusable attention in ``gm`` in place.

    Returns one record per attention-like site, the guards of buffers whose values a mask
    predicate relies on, and (only when there are guards) a copy of the graph as it was,
    to run when a guard fails.
    """
    records, plans = [], []
    writes = mutations.GraphWrites(gm.graph)
    for softmax, found in matcher.find_sites(gm):
        location, module = source_location(softmax), module_path(softmax)
        if isinstance(found, Refusal):
            records.append(SiteRecord(location, False, str(found), module=module))
            continue
        try:
            found = _lift_checked(found, softmax, writes, options, example_inputs)
            expand = rewrite.check_batch(found)
            spec = rewrite.describe(found, location)
        except Refusal as refusal:
            records.append(SiteRecord(location, False, str(refusal), module=module))
            continue
        reason = _policy_refusal(spec, options)
        if reason is not None:
            records.append(SiteRecord(location, False, reason, spec, module=module))
            continue
        plans.append((found, expand))
        records.append(SiteRecord(location, True, None, spec, runs_on=_runs_on(spec, options, rewrite.trainable(found)),
                                  module=module))
    if options.context_parallel:
        _check_context_parallel(records, [match for match, _ in plans])
    guards = [g for match, _ in plans for g in match.guards]
    original = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if guards else None
    replaced: dict = {}
    for match, expand in plans:
        rewrite.rewrite(gm, match, expand, replaced, run=options.run().encode())
    if plans:
        gm.graph.lint()
        gm.recompile()
    for r in records:
        if r.fused:
            counters["fusepass"]["attention_fused"] += 1
            log.info("fused attention at %s: %s", _where(r), r.spec)
        else:
            counters["fusepass"]["attention_rejected"] += 1
            log.debug("not fusing attention at %s: %s", _where(r), r.reason)
    return records, guards, original


def _lift_checked(found, softmax, writes, options: Options, example_inputs):
    """Lift masks into predicates, unless in-place writes make what was read untrue.

    A mask built in place (``torch.full`` then ``masked_fill_``) cannot be read from its
    construction; it is then kept as a tensor argument, which the op reads as written.
    """
    lift = options.mask_predicates and example_inputs is not None
    if lift:
        predicates.lift(found, nodes.fake(nodes.softmax(softmax).input).shape, example_inputs)
    scores = nodes.fake(nodes.softmax(softmax).input)
    try:
        writes.check(found, mutations.leaves_of(found))
    except Refusal as refusal:
        if not lift:
            raise
        log.debug("masks at %s not read as predicates: %s", softmax.name, refusal)
        found = matcher.match_site(softmax)
        writes.check(found, mutations.leaves_of(found))
    reason = predicates.fp16_absorbing_bias(found, scores.shape, example_inputs)
    if reason is not None:
        raise Refusal(reason)
    return found


def _check_context_parallel(records: list[SiteRecord], fused: list) -> None:
    """Under context parallelism every attention-like site must run as a ring: one left as
    written, or one the ring cannot serve, is an error naming it (``fused``: the matches of
    the fused records, in their order)."""
    from .parallel import sites

    matches = iter(fused)
    for r in records:
        if r.fused:
            masks = [tuple(nodes.fake(mk.cond).shape) for mk in next(matches).masks]
            reason = sites.refusal(r.spec, masks)
        else:
            reason = f"it is not fused ({r.reason})"
        if reason is not None:
            raise sites.error(r.location, reason)


def _guarded(compiled: Callable, guards: list[Guard], original: fx.GraphModule) -> Callable:
    """Check, per call, that buffers read by value still hold what the predicate assumed;
    when one does not, run the graph as the user wrote it (correct, unfused)."""
    warned = []

    def trusted(args) -> bool:
        if all(g.check(args[g.input_index]) for g in guards):
            return True
        if not warned:
            warned.append(True)
            log.warning("fusepass: a mask buffer changed since compilation; running this graph unfused")
        return False

    def run(*args):
        return compiled(*args) if trusted(args) else original(*args)

    return run


def _policy_refusal(spec, options: Options) -> Optional[str]:
    if not options.fuse:
        return "fusion is turned off (option fuse=False)"
    if spec.dtype == "float16" and len(spec.bias_shapes) > 1:
        # Eager sums fp16 scores and fp16 masks in fp16: two large fills (or a fill and a
        # score) overflow to -inf there, so rows become NaN that the op's fp32 sum keeps finite.
        return "float16 scores with several additive terms: eager's fp16 sum can overflow to -inf"
    n = spec.k_shape[2]
    if isinstance(n, int) and n < options.min_seq_len:
        return f"key length {n} is below min_seq_len={options.min_seq_len}"
    return None


def _runs_on(spec, options: Options, trainable: bool = False) -> str:
    """Where the op will run for this site, as far as is known at compile time."""
    # Symbolic head dims are read at their hint: this is a description, and must not guard.
    reason = support.fallback_reason(
        spec.device, getattr(torch, spec.dtype), nodes.size_hint(spec.q_shape[3]),
        nodes.size_hint(spec.v_shape[3]), spec.mask_fill, softcap=spec.softcap, interpret=options.run().interpret,
    )
    if reason is not None:
        return f"reference ({reason})"
    family = _family(spec)
    return f"triton, {family}{_fp8(spec, trainable, family) if options.fp8 else ''}"


def _fp8(spec, trainable: bool, family: str) -> str:
    """What options={"fp8": True} does at this site (kernels/fp8.py serves the prefill family)."""
    if family == DECODE_FAMILY:
        return "; not fp8 (the decode family)"
    if trainable:
        return "; not fp8 (a trainable site keeps its dtype)"
    if getattr(torch, spec.dtype) not in fp8.SERVED_DTYPES:
        return f"; not fp8 ({spec.dtype})"
    return "; fp8 e4m3 once its first call passes the accuracy guard"


DECODE_FAMILY = "decode family (split-KV)"


def _family(spec) -> str:
    """Which kernel family serves the site's shape (kernels/decode.py has the rule)."""
    from fusepass.kernels import decode

    sizes = (spec.q_shape[0], spec.q_shape[2], spec.q_shape[1], spec.k_shape[1], spec.k_shape[2])
    if not all(isinstance(s, int) for s in sizes):
        return "decode family for short queries, else prefill (chosen per call)"
    B, M, Hq, Hkv, N = sizes
    refusal = decode.refusal_for(M, Hq // max(1, Hkv), N, spec.dropout_p, pairs=B * Hkv)
    return DECODE_FAMILY if refusal is None else f"prefill family (not decode: {refusal}){_prefill_kernel(spec)}"


def _prefill_kernel(spec) -> str:
    """On CUDA: which prefill kernel the site's calls take, the sm_90 TMA forward or the FA2 one
    (kernels/sm90.py has the rule; a call's strides and pointers are only known per call)."""
    from fusepass.kernels import sm90

    if not spec.device.startswith("cuda"):
        return ""
    capability = torch.cuda.get_device_capability(spec.device) if torch.cuda.is_available() else None
    reason = sm90.static_refusal("cuda", getattr(torch, spec.dtype), nodes.size_hint(spec.q_shape[3]),
                                 nodes.size_hint(spec.v_shape[3]), capability)
    if reason is None:
        return "; sm_90 TMA kernels (forward and backward) where q, k, v are TMA-aligned, else FA2"
    return f"; FA2 forward (not sm_90: {reason})"


def _inner_compile(gm: fx.GraphModule, example_inputs, options: Options, mode: Optional[str]) -> Callable:
    if options.inner == "eager":
        return gm.forward
    if options.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=compile_cache.config_patches(patches))


def fusepass_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Optional[dict] = None,
    mode: Optional[str] = None,
) -> Callable:
    """``torch.compile(model, backend="fusepass", options={...})``."""
    opts = resolve_options(options)
    # Whether to tune (and where to run) travels in each op call this compile emits
    # (Options.run), not in process state.
    records, guards, original = fuse_attention(gm, opts, example_inputs)
    for recorder in _recorders:
        recorder.extend(records)
    compiled = _inner_compile(gm, example_inputs, opts, mode)
    return _guarded(compiled, guards, original) if guards else compiled
