"""One compiled graph, many shapes: masks read into predicates stay right at every shape a
compiled graph serves.

Each form is compiled once and called with a sequence of shapes (N = 33, 7, 64, 100, 1; M != N
both ways; the batch changes), so Dynamo first compiles static, then recompiles with symbolic
lengths, specializes N = 1, and otherwise reuses its graphs.  Every call is checked, forward and
backward, against eager and a float64 eager run, rows with no visible key included; through the
op's CPU reference, the Triton kernels under Triton's interpreter (every call must run them), and
CUDA.  What must hold per call: the predicate's symbolic arguments (a bottom-right offset N - M,
a band width from a size) evaluated at that call, the predicate's block map for that call's
(M, N, arguments), the padding mask's tile classes computed for that call's mask, the guard of a
buffer read by value checked, and the additive masks kept as tensors where the fully hidden rows
of a padded batch need them (see test_masks_backend.py's additive section).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from e2e_util import fused_count, unique_graphs
from test_masks_backend import (  # noqa: F401  (op_run and inner_graphs are fixtures)
    Run, _additive, _finish, _padded, _positions, _scores, attention_calls, check_site, inner_graphs, op_run,
)

H, D = 2, 16
# (B, M, N), in call order: the first call compiles static shapes, the second dynamic ones.
SHAPES = [(2, 33, 33), (2, 7, 7), (2, 64, 64), (1, 100, 100), (2, 1, 1), (2, 7, 1), (2, 20, 37), (3, 37, 20)]


def padding(b: int, n: int) -> torch.Tensor:
    """attention_mask [b, n]: batch 0 left-padded by n // 3, the last batch right-padded from
    2n // 3 (all of it at n = 1: every row of that batch hidden)."""
    am = torch.ones(b, n)
    am[0, : n // 3] = 0
    if b > 1:
        am[-1, (2 * n) // 3:] = 0
    return am


def sliding_window_min_padding(q, k, v, am):
    i, j = _positions(q, k)
    keep = (i - j < 4) & (j <= i) & _padded(am)
    s = _scores(q, k)
    return _finish(s.masked_fill(~keep, torch.finfo(s.dtype).min), v)


def band_from_a_size_where_min_padding(q, k, v, am):
    # the width is a size of the graph (N // 4): a predicate argument, symbolic once lengths are
    i, j = _positions(q, k)
    s = _scores(q, k)
    keep = (torch.abs(i - j) <= k.size(-2) // 4) & _padded(am)
    return _finish(torch.where(keep, s, torch.finfo(s.dtype).min), v)


def kv_cache_causal_inf_padding(q, k, v, am):
    # queries are the last M of N positions: the offset N - M is a predicate argument; with
    # M > N the first rows see no key (NaN, as in eager)
    i, j = _positions(q, k, bottom_right=True)
    return _finish(_scores(q, k).masked_fill(~((j <= i) & _padded(am)), float("-inf")), v)


def band_additive_padding(q, k, v, am):
    # one additive mask holding band and padding (transformers' style): a bias in training
    i, j = _positions(q, k)
    s = _scores(q, k)
    return _finish(s + _additive((torch.abs(i - j) <= 3) & _padded(am), s), v)


def window_plus_padding_additive(q, k, v, am):
    # two additive masks: keys hidden by both are -inf in eager
    i, j = _positions(q, k)
    s = _scores(q, k)
    return _finish(s + _additive((i - j < 4) & (j <= i), s) + _additive(_padded(am), s), v)


class TrilBufferPadding(nn.Module):
    """nanoGPT's tril buffer sliced to [M, N] (read by value, under a guard), finfo.min fills."""

    def __init__(self, size: int = 128):
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(size, size)).view(1, 1, size, size))

    def forward(self, q, k, v, am):
        M, N = q.size(-2), k.size(-2)
        s = _scores(q, k)
        s = s.masked_fill(self.tril[:, :, :M, :N] == 0, torch.finfo(s.dtype).min)
        return _finish(s.masked_fill(~_padded(am), torch.finfo(s.dtype).min), v)


# form -> (builder, what the op gets in training, also through the interpreter).  "predicate":
# the graphs' op calls carry the mask as a predicate (the N = 1 graphs may fold it away);
# "bias": the additive masks stay tensors (a padded batch has fully hidden rows).
# NOTE: each interpreted form costs ~7 s on the 2-core CI machine (4 s of it compiling six
# graphs); the guard of the tril buffer and the second additive mask change nothing the kernels
# see, so those two run on the reference (and CUDA) only; test_masks_backend.py's additive tests
# cover two additive masks in the interpreter.
FORMS = {
    "sliding_window_min_padding": (lambda: sliding_window_min_padding, "predicate", True),
    "band_from_a_size_where_min_padding": (lambda: band_from_a_size_where_min_padding, "predicate", True),
    "kv_cache_causal_inf_padding": (lambda: kv_cache_causal_inf_padding, "predicate", True),
    "band_additive_padding": (lambda: band_additive_padding, "bias", True),
    "window_plus_padding_additive": (lambda: window_plus_padding_additive, "bias", False),
    "tril_buffer_padding": (lambda: TrilBufferPadding(), "predicate", False),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_one_compile_many_shapes(form, op_run: Run, inner_graphs):
    build, lifted_as, interpreted = FORMS[form]
    if op_run.name == "interpreter" and not interpreted:
        pytest.skip("reference and CUDA only (see FORMS)")
    fn = build()
    compiled = torch.compile(fn, backend="fusepass", options=op_run.options)
    for b, m, n in SHAPES:
        torch.manual_seed(1000 * b + 10 * m + n)
        q, k, v = torch.randn(b, H, m, D), torch.randn(b, H, n, D), torch.randn(b, H, n, D)
        check_site(fn, [q, k, v, padding(b, n)], (0, 1, 2), op_run, f"{form} at B={b} M={m} N={n}",
                   compiled=compiled)
    # Every graph Dynamo compiled for these shapes (static, dynamic, N = 1, M != N, batch 1)
    # fused its one site, and got the mask as the form says.
    assert fused_count() == unique_graphs() == len(inner_graphs), (fused_count(), unique_graphs())
    calls = [call for gm in inner_graphs for call in attention_calls(gm)]
    if lifted_as == "predicate":
        assert all(call.args[3] == [] for call in calls), "a mask stayed a bias"
        assert sum(bool(call.args[10]) for call in calls) >= len(calls) - 2, [c.args[10] for c in calls]
    else:
        assert all(call.args[3] and not call.args[10] for call in calls), [(c.args[3], c.args[10]) for c in calls]
