"""Tile classification: never wrong (an EMPTY tile holds no visible entry, a FULL tile no hidden
one), tight on the common forms, and fast at 16k x 16k."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st

from fusepass.masks import predicate
from fusepass.masks.classify import classify
from fusepass.masks.tiles import Tile, block_map, skipped_fraction


def dense_tiles(expr, M, N, bm, bn, args=()):
    """(any visible, all visible) per tile, from the dense predicate."""
    keep = predicate.dense_keep(expr or "True", 1, 1, M, N, args)[0, 0]
    tm, tn = -(-M // bm), -(-N // bn)
    anyv = torch.zeros(tm, tn, dtype=torch.bool)
    allv = torch.zeros(tm, tn, dtype=torch.bool)
    for a in range(tm):
        for b in range(tn):
            t = keep[a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
            anyv[a, b], allv[a, b] = t.any(), t.all()
    return anyv, allv


def assert_sound(expr, M, N, bm, bn, args=()):
    kinds = block_map(expr, M, N, bm, bn, args)
    anyv, allv = dense_tiles(expr, M, N, bm, bn, args)
    assert not (anyv & (kinds == Tile.EMPTY)).any(), f"{expr}: an EMPTY tile has a visible entry"
    assert not (~allv & (kinds == Tile.FULL)).any(), f"{expr}: a FULL tile has a hidden entry"
    return kinds, anyv, allv


@pytest.mark.parametrize("expr,args", [
    ("j <= i", ()), ("(j <= i) & (j > i - 40)", ()), ("abs(i - j) <= 17", ()), ("j <= i + (N - M)", ()),
    ("(i // 32) == (j // 32)", ()), ("(j <= i) | (j < 20)", ()), ("(j <= i) | (i < 8) | (j < 8)", ()),
    ("j <= i + a0", (13,)), ("True", ()), ("False", ()),
])
@pytest.mark.parametrize("M,N", [(1, 1), (37, 129), (128, 128), (100, 300)])
def test_common_forms_sound_and_tight(expr, args, M, N):
    kinds, anyv, allv = assert_sound(expr, M, N, 16, 32, args)
    if "%" not in expr:
        # Aligned linear forms are decided exactly: every tile the dense map calls empty or full
        # is classified so (the interval bounds are attained at the tile corners).
        linear = "//" not in expr and "|" not in expr
        if linear:
            assert torch.equal(kinds == Tile.EMPTY, ~anyv), expr
            assert torch.equal(kinds == Tile.FULL, allv), expr


def test_sliding_window_skips_most_tiles_fast():
    expr = "(j <= i) & (j > i - 1024)"
    block_map(expr, 16384, 16384, 128, 128)
    t0 = time.perf_counter()
    kinds = block_map(expr, 16384, 16384, 128, 128)
    ms = (time.perf_counter() - t0) * 1e3
    assert kinds.shape == (128, 128)
    assert ms < 50, f"block map took {ms:.1f} ms"
    # 9 key tiles per query tile at most can hold a visible entry (window 1024 = 8 tiles + diagonal)
    assert ((kinds != Tile.EMPTY).sum(1) <= 9).all()
    frac = skipped_fraction(expr, 16384, 16384)
    assert 0.92 < frac < 0.94
    assert skipped_fraction("j <= i", 1024, 1024, 128, 128) == pytest.approx(28 / 64)


def test_uses_b_h_ranges():
    kinds = block_map("(h < 2) | (j <= i)", 64, 64, 16, 16, B=1, H=2)
    assert (kinds == Tile.FULL).all()
    kinds = block_map("(h < 2) | (j <= i)", 64, 64, 16, 16, B=1, H=4)
    assert not (kinds == Tile.EMPTY).any()


# -- property test --------------------------------------------------------------------------

_leaf = st.sampled_from(["i", "j", "M", "N", "a0"])


@st.composite
def _term(draw):
    a, b = draw(_leaf), draw(_leaf)
    c = draw(st.integers(-20, 20))
    k = draw(st.integers(1, 9))
    form = draw(st.sampled_from([
        "{a} - {b} + {c}", "{a} + {c}", "abs({a} - {b}) - {k}", "{a} // {k}", "{a} % {k}", "{k} * {a} - {b}",
        "min({a}, {b})", "max({a}, {b} + {c})", "-{a}",
    ]))
    return form.format(a=a, b=b, c=c, k=k)


@st.composite
def _pred(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        return f"({draw(_term())} {op} {draw(_term())})"
    l, r = draw(_pred(depth - 1)), draw(_pred(depth - 1))
    return draw(st.sampled_from([f"({l} & {r})", f"({l} | {r})", f"(~{l})"]))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_pred(), st.integers(1, 70), st.integers(1, 70), st.sampled_from([1, 4, 16]), st.sampled_from([1, 8, 32]),
       st.integers(-10, 40))
def test_tile_classification_never_wrong(expr, M, N, bm, bn, a0):
    assert_sound(expr, M, N, bm, bn, (a0,))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(_pred())
def test_classify_text_is_equivalent(expr):
    """The simplified text classify() prints means the same as the input."""
    c = classify(expr)
    for M, N, a0 in ((9, 13, 3), (16, 5, -2)):
        want = predicate.dense_keep(expr, 1, 1, M, N, (a0,))
        got = predicate.dense_keep(c.text or "True", 1, 1, M, N, (a0,))
        assert torch.equal(got, want), (expr, c.text)


def test_block_map_is_a_real_cpu_tensor_under_fake_mode():
    """The backend may classify tiles while a fake mode is active: the map must still be real."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    want = block_map("(j <= i) & (j > i - 40)", 100, 300, 16, 32)
    with FakeTensorMode():
        got = block_map("(j <= i) & (j > i - 40)", 100, 300, 16, 32)
    assert not isinstance(got, FakeTensor) and got.device.type == "cpu" and got.dtype == torch.int8
    assert torch.equal(got, want)
