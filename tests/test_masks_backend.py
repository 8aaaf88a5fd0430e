"""Masks written as code, end to end through the backend: each form written the ways models
write it is read into the op's position predicate (explain names it), the rewritten graph no
longer builds the [M, N] mask, and the numbers equal eager forward and backward, rows with no
visible key included (NaN with a -inf fill, a uniform average with a finfo.min fill).

How "the op received the predicate" is checked: the test wraps the backend's inner compiler
(``fusepass.backend._inner_compile``) to keep the graph it is handed, i.e. the graph after the
rewrite.  Its ``fusepass::attention`` call must carry the predicate text, no additive mask, only
the data part as a mask tensor, and no node outside that data part may have [M, N] trailing
dimensions (the position part is not computed any more).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fusepass
from fusepass import backend as fusepass_backend
from fusepass.masks import classify
from fusepass.ops.attention import FORWARD_OPS

from conftest import assert_close_to_reference
from e2e_util import (
    FUSED_BACKWARD_OP, FUSED_OP, count_op_calls, fused_count, projection_loss, projection_weights, rejected_count,
    unique_graphs,
)

OPTIONS = {"inner": "aot_eager"}
B, H, D = 2, 2, 8


# -- the graph the inner compiler gets --------------------------------------------------------

@pytest.fixture
def inner_graphs(monkeypatch):
    """Every graph fusepass hands its inner compiler (after the rewrite), in order."""
    graphs: list[fx.GraphModule] = []
    real = fusepass_backend._inner_compile

    def recording(gm, example_inputs, options, mode):
        graphs.append(gm)
        return real(gm, example_inputs, options, mode)

    monkeypatch.setattr(fusepass_backend, "_inner_compile", recording)
    return graphs


def attention_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FORWARD_OPS]


def _shape(n: fx.Node) -> Optional[tuple]:
    v = n.meta.get("example_value", n.meta.get("val"))
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _ancestors(roots) -> set[fx.Node]:
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # symbolic sizes that cannot be compared without a guard
        return str(a) == str(b)


def check_rewritten_graph(gm: fx.GraphModule, position_name: str, data_masks: int) -> fx.Node:
    """The op got the predicate; the graph computes no [M, N] mask beyond the data part."""
    (call,) = attention_calls(gm)
    q, k, v, biases, masks, seed, scale, softcap, dropout_p, mask_fill, mask_expr, mask_args, run = call.args
    assert biases == [], f"an additive mask stayed a bias: {biases}"
    assert len(masks) == data_masks, f"expected {data_masks} data mask(s), op got {masks}"
    if position_name:
        assert mask_expr, "the op got no predicate"
        assert classify.describe(mask_expr) == position_name, mask_expr
    else:
        assert mask_expr == ""
    M, N = _shape(q)[2], _shape(k)[2]
    data_part = _ancestors(masks)
    for n in gm.graph.nodes:
        s = _shape(n)
        if n in data_part or s is None or len(s) < 2:
            continue
        assert not (_same(s[-2], M) and _same(s[-1], N)), (
            f"the rewritten graph still computes {n.format_node()} of shape {s}")
    return call


# -- how models apply a keep mask to the scores -----------------------------------------------

def _scores(q, k):
    return (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))


def _finish(s, v):
    return F.softmax(s, dim=-1) @ v


APPLY = {
    # nanoGPT / most hand-written attention
    "masked_fill_inf": lambda s, keep: s.masked_fill(~keep, float("-inf")),
    # transformers' eager_mask: an additive 0 / finfo.min mask (in the model's dtype) added to the scores
    "additive_min": lambda s, keep: s + torch.where(
        keep, torch.tensor(0.0, device=keep.device, dtype=s.dtype), torch.finfo(s.dtype).min),
    # where(keep, s, finfo.min): fully hidden rows average uniformly
    "where_min": lambda s, keep: torch.where(keep, s, torch.finfo(s.dtype).min),
}


def _ij(q, k, offset: int = 0):
    """Query positions (offset by a cache length) against key positions."""
    i = torch.arange(offset, offset + q.size(-2), device=q.device)[:, None]
    j = torch.arange(k.size(-2), device=q.device)[None, :]
    return i, j


def _segment_ids(n: int) -> torch.Tensor:
    """Packed documents: batch 0 holds three documents, batch 1 one."""
    seg = torch.zeros(B, n, dtype=torch.long)
    seg[0, n // 3:] = 1
    seg[0, (2 * n) // 3:] = 2
    return seg


def _left_padding(n: int) -> torch.Tensor:
    """attention_mask [B, N] of 1 (token) / 0 (pad): batch 0 has 5 pads on the left."""
    am = torch.ones(B, n, dtype=torch.long)
    am[0, :5] = 0
    return am


def causal_arange(q, k):
    i, j = _ij(q, k)
    return j <= i


def causal_tril_inline(q, k):
    T = q.size(-2)
    return torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))


def causal_kv_cache(q, k):
    # queries are the last M of N keys: position N - M + i
    N, M = k.size(-2), q.size(-2)
    i = torch.arange(N - M, N, device=q.device)[:, None]
    j = torch.arange(N, device=q.device)[None, :]
    return j <= i


def sliding_window(q, k):
    i, j = _ij(q, k)
    return (i - j < 4) & (j <= i)


def band(q, k):
    i, j = _ij(q, k)
    return torch.abs(i - j) <= 3


def prefix_lm(q, k):
    i, j = _ij(q, k)
    return (j <= i) | (j < 5)


def global_tokens(q, k):
    # Longformer-like: a local band, and the first 2 tokens see and are seen by all
    i, j = _ij(q, k)
    return (torch.abs(i - j) <= 2) | (j < 2) | (i < 2)


def chunked_causal(q, k):
    i, j = _ij(q, k)
    return (i // 4 == j // 4) & (j <= i)


def documents(q, k, seg):
    return seg[:, None, :, None] == seg[:, None, None, :]


def documents_causal(q, k, seg):
    i, j = _ij(q, k)
    return (seg[:, None, :, None] == seg[:, None, None, :]) & (j <= i)


def documents_causal_or_global(q, k, seg):
    i, j = _ij(q, k)
    return ((seg[:, None, :, None] == seg[:, None, None, :]) & (j <= i)) | (j < 2)


def padding_causal(q, k, am):
    i, j = _ij(q, k)
    return (j <= i) & am[:, None, None, :].bool()


def padding_sliding_window(q, k, am):
    i, j = _ij(q, k)
    return am[:, None, None, :].bool() & ((i - j < 4) & (j <= i))


@dataclasses.dataclass(frozen=True)
class Form:
    keep: Callable                 # (q, k, *extra) -> bool keep mask broadcastable to [B, H, M, N]
    mask: str                      # what explain must say
    M: int = 13
    N: int = 13
    extra: Callable = lambda n: ()  # the extra inputs at key length n
    data_masks: int = 0            # how many data masks the op must still get
    empty_rows: bool = False       # the form has rows with no visible key (asserted)

    @property
    def position_name(self) -> str:
        return self.mask.removesuffix(" & tensor") if self.mask != "tensor" else ""


FORMS = {
    "causal_arange": Form(causal_arange, "causal"),
    "causal_tril_inline": Form(causal_tril_inline, "causal"),
    "causal_kv_cache": Form(causal_kv_cache, "causal(offset=8)", M=5, N=13),
    # more queries than keys, aligned bottom-right: the first M - N rows see no key
    "causal_kv_cache_empty_rows": Form(causal_kv_cache, "causal(offset=-7)", M=13, N=6, empty_rows=True),
    "sliding_window": Form(sliding_window, "sliding_window(4)"),
    "band": Form(band, "band(3)"),
    "prefix_lm": Form(prefix_lm, "prefix_lm(5)"),
    "global_tokens": Form(global_tokens, "band(2) | global_columns(2) | global_rows(2)"),
    "chunked_causal": Form(chunked_causal, "causal & chunked(4)"),
    "documents": Form(documents, "tensor", extra=lambda n: (_segment_ids(n),), data_masks=1),
    "documents_causal": Form(documents_causal, "causal & tensor", extra=lambda n: (_segment_ids(n),), data_masks=1),
    # an | over a data term: the whole mask is data
    "documents_causal_or_global": Form(documents_causal_or_global, "tensor", extra=lambda n: (_segment_ids(n),),
                                       data_masks=1),
    "padding_causal": Form(padding_causal, "causal & tensor", extra=lambda n: (_left_padding(n),), data_masks=1,
                           empty_rows=True),
    "padding_sliding_window": Form(padding_sliding_window, "sliding_window(4) & tensor",
                                   extra=lambda n: (_left_padding(n),), data_masks=1, empty_rows=True),
}


# ADDITIVE_IN_TRAINING: an additive 0 / finfo.min mask lifted to where(keep, s, finfo.min) has
# the same forward (s + min rounds to min), but in a row with no visible key eager's softmax is
# uniform and its gradient flows back through s + min to q and k, where the op's where() sends
# none.  So with gradients the backend lifts an additive mask only when it proves that no row is
# empty (M == N and the diagonal visible, no data part); otherwise the mask stays a bias.


def make_fn(form: Form, apply: str):
    def attention(q, k, v, *extra):
        keep = form.keep(q, k, *extra)
        return _finish(APPLY[apply](_scores(q, k), keep), v)

    return attention


def qkv(M: int, N: int, dtype=torch.float32):
    return torch.randn(B, H, M, D, dtype=dtype), torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, H, N, D, dtype=dtype)


def forward_backward(fn, q, k, v, extra):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, *extra)
    grads = torch.autograd.grad(projection_loss(out), (q, k, v))
    return out.detach(), grads


def check_numerics(compiled, eager_fn, q, k, v, extra, label: str):
    """fp32 fused vs fp32 eager vs float64 eager, forward and dq, dk, dv; NaN where eager has NaN."""
    got, got_g = forward_backward(compiled, q, k, v, extra)
    eager, eager_g = forward_backward(eager_fn, q, k, v, extra)
    ref, ref_g = forward_backward(eager_fn, q.double(), k.double(), v.double(), extra)
    assert torch.equal(torch.isnan(got), torch.isnan(eager)), f"{label}: NaN rows differ from eager"
    assert_close_to_reference(got, eager, ref, name=f"{label} output")
    for name, a, e, r in zip("qkv", got_g, eager_g, ref_g):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{label}: NaN pattern of d{name} differs from eager"
        assert_close_to_reference(a, e, r, name=f"{label} d{name}")
    return got


def assert_runs_fused(compiled, q, k, v, extra, label: str):
    """Once compiled, one forward and backward runs the fused op and its backward once each
    (counted after the compile, so that tracing does not count)."""
    with count_op_calls() as calls:
        forward_backward(compiled, q, k, v, extra)
    assert calls[FUSED_OP] == 1 and calls[FUSED_BACKWARD_OP] == 1, f"{label}: {dict(calls)}"


@pytest.mark.parametrize("apply", list(APPLY))
@pytest.mark.parametrize("name", list(FORMS))
def test_mask_form(name, apply, inner_graphs, request):
    form = FORMS[name]
    # With gradients, an additive mask is lifted only when no row can be fully hidden (see
    # ADDITIVE_IN_TRAINING); otherwise the op gets it as a bias tensor and stays exact.
    lifted_in_training = not (apply == "additive_min" and (form.empty_rows or form.data_masks))
    fn = make_fn(form, apply)
    q, k, v = qkv(form.M, form.N)
    extra = form.extra(form.N)

    report = fusepass.explain(fn, q, k, v, *extra, options=OPTIONS)
    (site,) = report.sites
    assert site.fused, site.reason
    assert site.mask == form.mask
    assert fused_count() == 1
    check_rewritten_graph(inner_graphs[-1], form.position_name, form.data_masks)

    keep = form.keep(q, k, *extra).expand(B, H, form.M, form.N)
    has_empty_rows = bool((~keep.any(-1)).any())
    assert has_empty_rows == form.empty_rows, f"the fixture's rows with no visible key: {has_empty_rows}"

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fusepass", options=OPTIONS)
    out = check_numerics(compiled, fn, q, k, v, extra, f"{name}/{apply}")
    assert_runs_fused(compiled, q, k, v, extra, f"{name}/{apply}")
    if lifted_in_training:
        check_rewritten_graph(inner_graphs[-1], form.position_name, form.data_masks)
    else:
        (call,) = attention_calls(inner_graphs[-1])
        biases, mask_expr = call.args[3], call.args[10]
        assert len(biases) == 1 and mask_expr == "", "the additive mask should stay a bias in training"

    if form.empty_rows:
        empty = ~keep.any(-1)  # [B, H, M]
        if apply == "masked_fill_inf":
            assert torch.isnan(out[empty]).all() and not torch.isnan(out[~empty]).any()
        else:
            # finfo.min everywhere in the row: softmax is uniform over all N keys
            torch.testing.assert_close(out[empty], v.mean(-2, keepdim=True).expand_as(out)[empty])


# -- nanoGPT's tril buffer ----------------------------------------------------------------------

class TrilAttention(nn.Module):
    """nanoGPT's slow path: a registered tril buffer sliced to T, ``== 0`` into masked_fill(-inf)."""

    def __init__(self, block_size: int = 64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def test_nanogpt_tril_buffer(inner_graphs):
    model = TrilAttention()
    q, k, v = qkv(13, 13)
    (site,) = fusepass.explain(model, q, k, v, options=OPTIONS).sites
    assert site.fused and site.mask == "causal"
    check_rewritten_graph(inner_graphs[-1], "causal", 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fusepass", options=OPTIONS)
    check_numerics(compiled, model, q, k, v, (), "tril buffer")
    assert_runs_fused(compiled, q, k, v, (), "tril buffer")


def test_changed_tril_buffer_is_not_trusted():
    model = TrilAttention()
    compiled = torch.compile(model, backend="fusepass", options=OPTIONS)
    q, k, v = qkv(13, 13)
    with torch.no_grad():
        causal_out = compiled(q, k, v)
        torch.testing.assert_close(causal_out, model(q, k, v))
        graphs = unique_graphs()
        assert fused_count() == 1

        model.bias.fill_(1)  # in place: same tensor, now "attend everywhere"
        full = model(q, k, v)
        assert not torch.allclose(full, causal_out), "the mutation must change the eager result"
        with count_op_calls() as calls:
            got = compiled(q, k, v)
    torch.testing.assert_close(got, full)
    assert calls[FUSED_OP] == 0, "the fused op ran with a predicate the buffer no longer holds"
    assert unique_graphs() == graphs, "expected the guarded fallback, not a recompile"

    # The new values are not a tril either way: the mask is still honoured after a second change.
    with torch.no_grad():
        model.bias.copy_(torch.triu(torch.ones_like(model.bias)))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), equal_nan=True)


# -- dynamic shapes -------------------------------------------------------------------------------

# (build, mask name at every length or None when it holds the length, q/k lengths at n, extra inputs)
DYNAMIC = {
    "tril_buffer": (lambda: TrilAttention(), "causal", lambda n: (n, n), lambda n: ()),
    "padding_causal_where_min": (lambda: make_fn(FORMS["padding_causal"], "where_min"), "causal & tensor",
                                lambda n: (n, n), lambda n: (_left_padding(n),)),
    # 4 new queries against a growing cache: the offset N - M is a size of the graph
    "kv_cache": (lambda: make_fn(FORMS["causal_kv_cache"], "masked_fill_inf"), None, lambda n: (4, n), lambda n: ()),
}
LENGTHS = (11, 17, 29)


@pytest.mark.parametrize("case", list(DYNAMIC))
def test_dynamic_lengths_keep_the_predicate(case, inner_graphs):
    build, name, shape, extra_of = DYNAMIC[case]
    fn = build()
    compiled = torch.compile(fn, backend="fusepass", options=OPTIONS)
    names = []
    for n in LENGTHS:
        M, N = shape(n)
        q, k, v = qkv(M, N)
        extra = extra_of(N)
        check_numerics(compiled, fn, q, k, v, extra, f"{case} at N={n}")
        assert_runs_fused(compiled, q, k, v, extra, f"{case} at N={n}")
        (call,) = attention_calls(inner_graphs[-1])
        assert call.args[10], f"no predicate at N={n}"
        names.append(classify.describe(call.args[10]))
    graphs = unique_graphs()
    assert 1 <= graphs <= 2, f"{len(LENGTHS)} lengths compiled {graphs} graphs"
    assert len(inner_graphs) == graphs and fused_count() == graphs and rejected_count() == 0
    position = name.removesuffix(" & tensor") if name else None
    if name is None:
        M0, N0 = shape(LENGTHS[0])
        assert names[0] == f"causal(offset={N0 - M0})"
        assert all(re.fullmatch(r"causal\(offset=.+\)", x) for x in names), names
    else:
        assert names == [position] * len(LENGTHS), names

    # explain at the second length, the sequence dimension dynamic, names the mask as the
    # automatic-dynamic graph above does
    torch._dynamo.reset()
    M, N = shape(LENGTHS[1])
    q, k, v = qkv(M, N)
    extra = extra_of(N)
    for t in (k, v) if M != N else (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    for t in extra:
        torch._dynamo.mark_dynamic(t, 1)
    (site,) = fusepass.explain(fn, q, k, v, *extra, options=OPTIONS).sites
    assert site.fused, site.reason
    assert not isinstance(site.k_shape[2], int), "explain's graph was not dynamic in N"
    assert site.mask == (name or names[-1])


def test_skipped_fraction_at_a_larger_shape():
    """explain's skipped_fraction comes from the predicate: a window of 128 at N=1024 skips
    the 128-tiles outside the band (1 - (8 + 7) / 64 of them)."""
    def fn(q, k, v):
        i, j = _ij(q, k)
        return _finish(_scores(q, k).masked_fill(~((i - j < 128) & (j <= i)), float("-inf")), v)

    q, k, v = (torch.randn(1, 1, 1024, 8) for _ in range(3))
    (site,) = fusepass.explain(fn, q, k, v, options=OPTIONS).sites
    assert site.mask == "sliding_window(128)"
    assert site.skipped_fraction == pytest.approx(1 - 15 / 64)


# -- additive masks and rows with no visible key, wherever the op runs ----------------------------
#
# An additive 0 / finfo.min mask equals a replacing predicate in every row that keeps a visible
# key.  In a row with none, eager differs from "replace by fill" in three ways (see
# fusepass.graph.predicates.lift): its gradient flows through s + min to q, k and every bias of
# the row; a key hidden by two such masks sums to -inf in fp32, so the row averages only the keys
# hidden once (or is NaN when every key is hidden twice); and a bias kept as a tensor may itself
# hide the keys the predicate shows.  The tests below build exactly those rows and compare them
# with eager (outputs and gradients, by the float64 rule) on the op's CPU reference, on the Triton
# kernels under Triton's interpreter, and on CUDA.


@dataclasses.dataclass(frozen=True)
class Run:
    name: str                 # "reference", "interpreter" or "cuda"
    options: dict             # torch.compile options
    device: str
    kernel_calls: dict        # "bwd": Triton backward calls seen so far (forward: launch_common's counter)


RUNS = [pytest.param("reference"), pytest.param("interpreter"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=RUNS)
def op_run(request, monkeypatch, tmp_path_factory):
    """Where the fused op runs.  The interpreter's kernel outputs are poisoned (NaN) before they
    run; the interpret option is process-wide (the latest compile's), so it is undone after."""
    from collections import Counter

    calls: Counter = Counter()
    if request.param == "reference":
        yield Run("reference", dict(OPTIONS), "cpu", calls)
        return
    pytest.importorskip("triton")
    import fusepass.kernels.backward as kernel_bwd
    from fusepass.kernels import launch_common

    # The forward counts the launchers' own counter of either family (short queries against a
    # cache whose length changes between calls run the decode family): a call served by a
    # runner (ops/dispatch.py) launches without calling attention_forward.
    real = kernel_bwd.attention_backward
    monkeypatch.setattr(kernel_bwd, "attention_backward", lambda *a, **kw: calls.update(["bwd"]) or real(*a, **kw))
    if request.param == "cuda":
        yield Run("cuda", dict(OPTIONS), "cuda", calls)
        return
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusepass-cache"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launch_common, "poison_outputs", True)
    yield Run("interpreter", {**OPTIONS, "interpret": True, "autotune": False}, "cpu", calls)


def run_site(fn, inputs, grad_of):
    """fn's output and the gradients of ``inputs[k]`` for k in ``grad_of`` (none: no_grad)."""
    leaves = [t.detach().clone().requires_grad_(k in grad_of) if t.is_floating_point() else t
              for k, t in enumerate(inputs)]
    if not grad_of:
        with torch.no_grad():
            return fn(*leaves), ()
    out = fn(*leaves)
    weights = projection_weights(out.shape).to(out)  # projection_loss, on out's device
    return out.detach(), torch.autograd.grad((out * weights).sum(), [leaves[k] for k in grad_of])


def check_site(fn, inputs, grad_of, run: Run, label: str, compiled=None) -> torch.Tensor:
    """``compiled`` (by default fn compiled for ``run``) in fp32 against fp32 eager and float64
    eager: output and gradients, NaN exactly where eager has NaN; the kernels ran when the run
    is not the reference."""
    inputs = [t.to(run.device) for t in inputs]
    if compiled is None:
        compiled = torch.compile(fn, backend="fusepass", options=run.options)
    from fusepass.kernels import launch_common

    before, launched = dict(run.kernel_calls), launch_common.forward_launches()
    got, got_g = run_site(compiled, inputs, grad_of)
    eager, eager_g = run_site(fn, inputs, grad_of)
    ref, ref_g = run_site(fn, [t.double() if t.is_floating_point() else t for t in inputs], grad_of)
    names = ["output"] + [f"grad of input {k}" for k in grad_of]
    for name, a, e, r in zip(names, (got, *got_g), (eager, *eager_g), (ref, *ref_g)):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{label}: NaN pattern of the {name} differs from eager"
        assert_close_to_reference(a, e, r, name=f"{label} {name}")
    if run.name != "reference":
        assert launch_common.forward_launches() > launched, f"{label}: the Triton forward did not run"
        if grad_of:
            assert run.kernel_calls["bwd"] > before.get("bwd", 0), f"{label}: the Triton backward did not run"
    return got


def _positions(q, k, bottom_right: bool = False):
    """Query rows (the last M of N positions when bottom_right) against key columns."""
    M, N = q.size(-2), k.size(-2)
    i = torch.arange(M, device=q.device)[:, None] + ((N - M) if bottom_right else 0)
    j = torch.arange(N, device=q.device)[None, :]
    return i, j


def _additive(keep, s, fill=None):
    """transformers' eager mask: 0 where keep, finfo(dtype).min (or ``fill``) elsewhere."""
    zero = torch.tensor(0.0, device=s.device, dtype=s.dtype)
    return torch.where(keep, zero, torch.finfo(s.dtype).min if fill is None else fill)


def _padded(am):
    return am[:, None, None, :].bool()


def causal_plus_padding(q, k, v, am):
    # two finfo.min masks added one after the other: keys hidden by both are -inf in eager
    i, j = _positions(q, k, bottom_right=True)
    s = _scores(q, k)
    return _finish(s + _additive(j <= i, s) + _additive(_padded(am), s), v)


def causal_plus_window(q, k, v, am):
    # two position masks that always leave the diagonal visible: safe to lift, rows never empty
    i, j = _positions(q, k)
    s = _scores(q, k)
    return _finish(s + _additive(j <= i, s) + _additive(i - j < 4, s), v)


def additive_then_masked_fill_min(q, k, v, am):
    i, j = _positions(q, k, bottom_right=True)
    s = _scores(q, k)
    s = s + _additive(j <= i, s)
    return _finish(s.masked_fill(~_padded(am), torch.finfo(s.dtype).min), v)


def masked_fill_inf_then_additive(q, k, v, am):
    i, j = _positions(q, k, bottom_right=True)
    s = _scores(q, k).masked_fill(~_padded(am), float("-inf"))
    return _finish(s + _additive(j <= i, s), v)


def additive_inf_plus_additive_min(q, k, v, am):
    i, j = _positions(q, k, bottom_right=True)
    s = _scores(q, k)
    return _finish(s + _additive(j <= i, s, float("-inf")) + _additive(_padded(am), s), v)


def _causal_name(M: int, N: int) -> str:
    return "causal" if M == N else f"causal(offset={N - M})"


# form -> (fn, expected(M, N, grad) = what the op gets: (number of biases, predicate name or "")).
# Kept as biases: whenever a row may be fully hidden and the lifted form would differ there.
ADDITIVE_FORMS = {
    "causal_plus_padding": (causal_plus_padding, lambda M, N, grad: (2, "")),
    # 40x36: the last rows see no key of the window (i - 4 < j <= i, j < 36): not provably safe
    "causal_plus_window": (causal_plus_window, lambda M, N, grad: (0, "sliding_window(4)") if M <= N else (2, "")),
    # one finfo.min mask and a bool finfo.min fill: inference may lift it (hidden entries are all
    # exactly min), training may not (gradient through s + min in the fully padded rows)
    "additive_then_masked_fill_min": (additive_then_masked_fill_min,
                                      lambda M, N, grad: (1, "") if grad else (0, _causal_name(M, N))),
    # the bool mask's -inf fill stays; the finfo.min mask is added under it (a bias)
    "masked_fill_inf_then_additive": (masked_fill_inf_then_additive, lambda M, N, grad: (1, "")),
    "additive_inf_plus_additive_min": (additive_inf_plus_additive_min,
                                       lambda M, N, grad: (2, "") if grad else (1, _causal_name(M, N))),
}
# (M, N): rows as long as keys; more queries than keys (the first M - N rows see no causal key),
# several 32 x 32 interpreter tiles per row.
ADDITIVE_SHAPES = {"7x7": (7, 7), "40x36": (40, 36)}


def _padding_with_hidden_rows(n: int) -> torch.Tensor:
    """[B, N]: batch 0 left-padded by 2 (its first rows see only padding under causal),
    batch 1 all padding (every row hidden; where causal hides a key too, it is hidden twice)."""
    am = torch.ones(B, n)
    am[0, :2] = 0
    am[1] = 0
    return am


@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("shape", list(ADDITIVE_SHAPES))
@pytest.mark.parametrize("form", list(ADDITIVE_FORMS))
def test_additive_masks_with_hidden_rows(form, shape, grad, op_run, inner_graphs):
    """Additive finfo.min masks combined with each other, with a bool masked_fill, and with a
    -inf masked score, in rows hidden by all of them: eager's values and gradients."""
    fn, expected = ADDITIVE_FORMS[form]
    M, N = ADDITIVE_SHAPES[shape]
    q, k, v = qkv(M, N)
    am = _padding_with_hidden_rows(N)
    check_site(fn, [q, k, v, am], (0, 1, 2) if grad else (), op_run, f"{form}/{shape}")
    (call,) = attention_calls(inner_graphs[-1])
    n_biases, name = expected(M, N, grad)
    assert len(call.args[3]) == n_biases, f"biases {call.args[3]}"
    mask_expr = call.args[10]
    assert (classify.describe(mask_expr) if mask_expr else "") == name, mask_expr


def padding_expanded(q, k, v, am):
    # BERT's eager mask: the key-padding vector expanded to [B, 1, M, N] before the where()
    s = _scores(q, k)
    keep = _padded(am).expand(-1, 1, q.size(-2), -1)
    return _finish(s + _additive(keep, s), v)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_an_expanded_padding_mask_reaches_the_op_as_a_key_vector(grad, op_run, inner_graphs):
    """A key-padding mask the code expands to [B, 1, M, N] is a [B, 1, 1, N] vector.  Training
    keeps it additive (a fully padded batch: eager's gradients through s + min), and the op
    takes where(padding, 0, min) on the vector's shape; inference lifts it to the bool vector.
    Either way nothing [M, N] is built any more, and the numbers are eager's."""
    M, N = 40, 36
    q, k, v = qkv(M, N)
    am = _padding_with_hidden_rows(N)
    check_site(padding_expanded, [q, k, v, am], (0, 1, 2) if grad else (), op_run, "padding_expanded")
    gm = inner_graphs[-1]
    (call,) = attention_calls(gm)
    biases, masks = call.args[3], call.args[4]
    assert len(biases) + len(masks) == 1, (biases, masks)
    if grad:
        (bias,) = biases
        assert bias.target == "to" and bias.args[0].target is torch.where, bias.format_node()
    mn = [n for n in gm.graph.nodes if (_shape(n) or ())[-2:] == (M, N)]
    assert not mn, [n.format_node() for n in mn]


def test_additive_masks_hidden_twice_average_the_keys_hidden_once():
    """The fixture's point, on eager alone: a row hidden by both masks averages only the keys
    hidden by exactly one (here the causal keys of an all-padding batch), NaN if there are none."""
    M, N = 9, 6
    q, k, v = qkv(M, N)
    out = causal_plus_padding(q, k, v, _padding_with_hidden_rows(N))
    i = torch.arange(M)[:, None] + (N - M)
    seen = (torch.arange(N)[None, :] <= i).float()  # batch 1: the keys hidden only by padding
    expect = (seen / seen.sum(-1, keepdim=True)) @ v[1]
    torch.testing.assert_close(out[1], expect, equal_nan=True)
    assert torch.isnan(out[1, :, : M - N]).all() and not torch.isnan(out[1, :, M - N:]).any()


def learned_bias_and_additive_mask(q, k, v, bias):
    i, j = _positions(q, k, bottom_right=True)
    s = _scores(q, k) + bias
    return _finish(s + _additive(j <= i, s), v)


@pytest.mark.parametrize("grad_of", [(3,), (2, 3)], ids=["bias", "v_and_bias"])
@pytest.mark.parametrize("shape", ["9x6", "40x36"])
def test_learned_bias_gradient_in_hidden_rows(shape, grad_of, op_run):
    """q, k frozen, a learned bias trained: in the rows the additive mask hides entirely (more
    queries than keys, bottom-right causal), eager's bias gradient is not zero.  A differentiable
    bias alone must keep the additive mask a tensor."""
    M, N = map(int, shape.split("x"))
    q, k, v = qkv(M, N)
    bias = torch.randn(H, M, N)
    check_site(learned_bias_and_additive_mask, [q, k, v, bias], grad_of, op_run, f"learned bias {shape}")


ALL_HIDDEN = {
    "full_min": lambda s, i, j: s + torch.full(s.shape[-2:], torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device),
    "where_min_everywhere": lambda s, i, j: s + _additive(j < 0, s),
    "where_inf_everywhere": lambda s, i, j: s + _additive(j < 0, s, float("-inf")),
}


@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("form", list(ALL_HIDDEN))
def test_additive_mask_that_hides_every_key(form, grad, op_run):
    """A mask whose predicate is False (every key hidden): the compile must not crash (it
    did, in sympy, on the Python bool False) and every row is eager's (uniform, or NaN)."""
    def fn(q, k, v):
        i, j = _positions(q, k)
        return _finish(ALL_HIDDEN[form](_scores(q, k), i, j), v)

    q, k, v = qkv(9, 7)
    out = check_site(fn, [q, k, v], (0, 1, 2) if grad else (), op_run, form)
    if form == "where_inf_everywhere":
        assert torch.isnan(out).all()
    else:
        torch.testing.assert_close(out.cpu(), v.mean(-2, keepdim=True).expand_as(out))
