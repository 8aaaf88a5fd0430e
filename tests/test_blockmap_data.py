"""Runtime block maps of data masks (bool ``masks`` of the op) and of predicates that read b/h.

CPU tests run the kernels (the mask classifier included) in Triton's interpreter; outputs are
poisoned with NaN before the kernels run.  Skipping is checked directly: keys in tiles that no
query sees hold NaN in V (a kernel that visits such a tile multiplies 0 by NaN and spreads it).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from fusepass.kernels import blockmap, launch_common, render  # noqa: E402
from fusepass.masks.predicate import dense_keep  # noqa: E402

from conftest import assert_close_to_reference  # noqa: E402
from kernel_cases import dense_attention  # noqa: E402
from fusepass.ops.dispatch import backward_call, forward_call

CAUSAL = "j <= i + (N - M)"


@pytest.fixture(autouse=True)
def _poison_and_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusepass-cache"))
    monkeypatch.setattr(launch_common, "poison_outputs", True)
    yield


# ----------------------------------------------------------------------------- helpers


def dense_classes(keep: torch.Tensor, bm: int, bn: int, cap_ragged: bool = True) -> torch.Tensor:
    """Expected classes of keep [..., M, N] in bm x bn tiles, by loops over tiles."""
    *lead, M, N = keep.shape
    R, C = -(-M // bm), -(-N // bn)
    out = torch.empty((*lead, R, C), dtype=torch.int8)
    for r in range(R):
        for c in range(C):
            t = keep[..., r * bm:(r + 1) * bm, c * bn:(c + 1) * bn]
            anyv = t.flatten(-2).any(-1)
            allv = t.flatten(-2).all(-1)
            if cap_ragged and (c + 1) * bn > N:
                allv = torch.zeros_like(allv)
            out[..., r, c] = torch.where(allv, 2, torch.where(anyv, 1, 0)).to(torch.int8)
    return out


def classes_from_lists(lists: blockmap.TileLists, n_cols: int) -> torch.Tensor:
    """Rebuild [P, rows, n_cols] classes from tile lists (tiles not listed are EMPTY)."""
    pidx, pcnt, fidx, fcnt = (t.reshape(-1, *t.shape[-2:]) if t.dim() > 1 else t for t in (
        lists.partial_idx, lists.partial_cnt, lists.full_idx, lists.full_cnt))
    pcnt, fcnt = pcnt.reshape(pidx.shape[0], -1), fcnt.reshape(pidx.shape[0], -1)
    out = torch.zeros((pidx.shape[0], pidx.shape[1], n_cols), dtype=torch.int8)
    for p in range(pidx.shape[0]):
        for r in range(pidx.shape[1]):
            for t in range(int(pcnt[p, r])):
                out[p, r, int(pidx[p, r, t])] = 1
            for t in range(int(fcnt[p, r])):
                assert out[p, r, int(fidx[p, r, t])] == 0, "a tile in both lists"
                out[p, r, int(fidx[p, r, t])] = 2
    return out


def tiled_mask(shape, bm, bn, gen, p_empty=0.4, p_full=0.3):
    """A bool mask with whole empty / full tiles and some mixed ones (structure worth skipping)."""
    *lead, M, N = shape
    R, C = -(-M // bm), -(-N // bn)
    kind = torch.rand((*lead, R, C), generator=gen)
    mixed = torch.rand(shape, generator=gen) > 0.5
    up = lambda t: t.repeat_interleave(bm, -2).repeat_interleave(bn, -1)[..., :M, :N]
    empty = up(kind < p_empty)
    full = up((kind >= p_empty) & (kind < p_empty + p_full))
    return (mixed | full) & ~empty


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """seg [B, N] document ids -> [B, 1, N, N] bool (same document), as packed-sequence code does."""
    return (seg[:, None, :, None] == seg[:, None, None, :])


# ----------------------------------------------------------------------------- block maps


@pytest.mark.parametrize("shape,g", [
    ((1, 1, 64, 64), 16),
    ((2, 3, 70, 45), 16),     # ragged rows and columns
    ((2, 1, 33, 100), 32),
    ((1, 2, 16, 129), 16),
])
def test_mask_classes_exact(shape, g):
    gen = torch.Generator().manual_seed(sum(shape) + g)
    mask = tiled_mask(shape, g, g, gen)
    got = blockmap.mask_classes(mask, shape[2], shape[3], g, g)
    # The classifier treats keys past N as don't-care (the cap is applied when lists are built).
    want = dense_classes(mask, g, g, cap_ragged=False)
    assert torch.equal(got, want)
    # Byte loads (any layout) and int32 word loads (4 contiguous keys) agree.
    assert torch.equal(blockmap.mask_classes(mask, shape[2], shape[3], g, g, words=False), want)
    assert (got == 0).any() and (got == 2).any() and (got == 1).any()


def test_mask_classes_broadcast_and_strides():
    gen = torch.Generator().manual_seed(1)
    B, H, M, N, g = 2, 3, 40, 72, 16
    pad = torch.rand(B, N, generator=gen) > 0.3
    pad[:, :32] = False  # left padding: two whole key tiles hidden
    views = {
        "b11n": pad[:, None, None, :],
        "expanded": pad[:, None, None, :].expand(B, H, M, N),  # stride 0 in h and m
        "transposed": (torch.rand(B, H, N, M, generator=gen) > 0.5).transpose(-1, -2),
        "2d": torch.rand(M, N, generator=gen) > 0.5,
        "rows_only": torch.rand(B, 1, M, 1, generator=gen) > 0.5,
    }
    for name, m in views.items():
        got = blockmap.mask_classes(m, M, N, g, g)
        want = dense_classes(m[(None,) * (4 - m.dim())].expand(B, H, M, N), g, g, cap_ragged=False)
        assert torch.equal(got.expand_as(want), want), name


@pytest.mark.parametrize("fr,fc", [(1, 2), (2, 1), (2, 4), (4, 4)])
def test_coarsen_equals_direct(fr, fc):
    gen = torch.Generator().manual_seed(fr * 10 + fc)
    M, N, g = 75, 130, 16
    mask = tiled_mask((2, 1, M, N), g, g, gen)
    base = blockmap.mask_classes(mask, M, N, g, g)
    direct = blockmap.mask_classes(mask, M, N, g * fr, g * fc)
    assert torch.equal(blockmap.coarsen(base, fr, fc), direct)


@pytest.mark.parametrize("expr,args", [("", []), (CAUSAL, []), ("(j <= i) & (i - j < a0)", [40])])
def test_call_lists_combine_mask_and_predicate(expr, args):
    """Empty exactly where mask AND predicate show nothing; full exactly where both show
    everything and the tile lies inside N; partial otherwise."""
    gen = torch.Generator().manual_seed(len(expr))
    B, H, M, N, bm, bn = 2, 2, 96, 100, 16, 32
    mask = tiled_mask((B, 1, M, N), bm, bn, gen)
    keep = mask.expand(B, H, M, N)
    if expr:
        keep = keep & dense_keep(expr, B, H, M, N, args)
    want = dense_classes(keep[:, :1], bm, bn).reshape(B, -(-M // bm), -(-N // bn))
    lists = blockmap.call_lists(expr, args, [mask], B, H, M, N, bm, bn, "cpu", by="row")
    assert lists.map_sb == 1 and lists.map_sh == 0  # per batch, shared by the heads
    assert torch.equal(classes_from_lists(lists, -(-N // bn)), want)
    cols = blockmap.call_lists(expr, args, [mask], B, H, M, N, bm, bn, "cpu", by="col")
    assert torch.equal(classes_from_lists(cols, -(-M // bm)), want.transpose(-1, -2))


def test_predicate_reading_head_gets_per_head_maps():
    expr = "(h == 0) | (j <= i)"
    bmap = blockmap.get(expr, [], 64, 64, 16, 16, "cpu", B=2, H=3)
    assert bmap.classes.shape == (1, 3, 4, 4)
    want = dense_classes(dense_keep(expr, 1, 3, 64, 64, [])[0], 16, 16)
    assert torch.equal(bmap.classes[0], want)
    assert bmap.by_row.map_sb == 0 and bmap.by_row.map_sh == 1
    assert (bmap.classes[0, 0] == 2).all() and (bmap.classes[0, 1] == 0).sum() == 6


def test_full_tiles_load_no_mask():
    from fusepass.kernels.spec import KernelSpec

    for direction in ("fwd", "bwd"):
        src = render.show(direction, n_masks=1)
        loads = src.count("tl.load(MASK0")
        # One load per partial tile body: fwd has one partial body, bwd two (dK/dV and dQ).
        assert loads == (1 if direction == "fwd" else 2), (direction, loads)
    assert KernelSpec(n_masks=1).block_map


# ----------------------------------------------------------------------------- numerics


def _run(q, k, v, masks, expr="", args=(), fill=-math.inf, backward=True, poison_v=None):
    """Kernels vs a float64 reference (and eager in q's dtype) for the given masks; returns
    the kernel outputs."""
    from fusepass.kernels.backward import attention_backward
    from fusepass.kernels.forward import attention_forward

    scale = q.shape[-1] ** -0.5
    feats = (None, scale, 0.0, 0.0, fill, expr, list(args))
    # ``poison_v``: the kernels read it instead of v; the references read the clean v (the
    # poisoned keys are invisible to every query, so the exact answer is the same).
    vk = v if poison_v is None else poison_v
    out, lse = attention_forward(forward_call(q, k, vk, [], masks, *feats))
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = dense_attention(*leaves64, [], masks, *feats)
    eager, _ = dense_attention(*leaves, [], masks, *feats)
    assert_close_to_reference(out, eager, ref, name="out")
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4, equal_nan=True)
    if not backward:
        return out, None
    do = torch.randn_like(out)
    dq, dk, dv, _ = attention_backward(backward_call(do, q, k, vk, out, lse, [], masks, *feats, []))
    ref, _ = dense_attention(*leaves64, [], masks, *feats)
    eager, _ = dense_attention(*leaves, [], masks, *feats)
    g64 = torch.autograd.grad(ref, leaves64, do.double())
    g = torch.autograd.grad(eager, leaves, do)
    for name, a, e, r in zip(("dq", "dk", "dv"), (dq, dk, dv), g, g64):
        assert_close_to_reference(a, e, r, name=name)
    return out, (dq, dk, dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_ids_forward_backward(dtype):
    """Packed documents (segment ids compared), causal within each document."""
    B, H, N, D = 2, 2, 96, 32
    seg = torch.tensor([[0] * 30 + [1] * 40 + [2] * 26, [0] * 64 + [1] * 32])
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(3))
    _run(q, k, v, [segment_mask(seg)], CAUSAL)
    _run(q, k, v, [segment_mask(seg)])


def test_left_padding_causal_skips_and_rows_without_keys():
    """Left padding (keys and queries before each sequence's start) + causal: padded query
    rows see no key (NaN, as eager); padded key tiles are never read."""
    B, H, N, D = 2, 2, 80, 16
    start = torch.tensor([32, 7])  # batch 0: two whole 16-key tiles of padding
    valid = torch.arange(N)[None, :] >= start[:, None]
    mask = (valid[:, None, :, None] & valid[:, None, None, :])  # [B, 1, N, N]
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    v_poisoned = v.clone()
    v_poisoned[0, :, :32] = float("nan")
    out, (dq, dk, dv) = _run(q, k, v, [mask], CAUSAL, poison_v=v_poisoned)
    assert torch.isnan(out[0, :, :32]).all() and not torch.isnan(out[0, :, 32:]).any()
    assert torch.isnan(out[1, :, :7]).all() and not torch.isnan(out[1, :, 7:]).any()
    # Key tiles nobody sees are never visited: exact zeros, no NaN from the poisoned V.
    assert torch.equal(dk[0, :, :32], torch.zeros_like(dk[0, :, :32]))
    assert torch.isnan(dv).all()  # both batches have rows with no visible key: eager's dv is NaN
    assert not torch.isnan(dq).any()


def test_rows_without_keys_finite_fill():
    """A finite fill (eager's finfo.min): rows that see nothing average V over all keys."""
    B, H, M, N, D = 1, 2, 48, 64, 16
    mask = torch.rand(B, 1, M, N) > 0.5
    mask[:, :, 16:32] = False  # a whole query tile with no visible key
    q, k, v = (torch.randn(B, H, M if t == 0 else N, D) for t in range(3))
    _run(q, k, v, [mask], fill=torch.finfo(torch.float32).min)


def test_two_masks_and_head_predicate():
    B, H, M, N, D = 2, 2, 40, 56, 16
    gen = torch.Generator().manual_seed(3)
    m1 = tiled_mask((B, 1, M, N), 16, 16, gen)
    m2 = torch.rand(B, 1, 1, N, generator=gen) > 0.2
    q, k, v = (torch.randn(B, H, L, D) for L in (M, N, N))
    _run(q, k, v, [m1, m2], "(h == 1) | (j <= i + (N - M))")


def test_head_predicate_skips_per_head():
    """Head 1 sees only keys < 20: its V in whole key tiles past that (the interpreter's tiles
    are 32 wide) is never read, so the NaN put there stays out."""
    expr = "(h == 0) | (j < 20)"
    B, H, N, D = 1, 2, 64, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    v_poisoned = v.clone()
    v_poisoned[:, 1, 32:] = float("nan")
    out, (dq, dk, dv) = _run(q, k, v, [], expr, poison_v=v_poisoned)
    assert not torch.isnan(out).any() and not torch.isnan(dq).any()
    assert torch.equal(dv[:, 1, 20:], torch.zeros_like(dv[:, 1, 20:]))


def test_op_computes_data_map_once_per_call(monkeypatch):
    """Through the op and autograd: the forward classifies the masks once; the backward's
    two launches reuse those classes (no second pass over the mask)."""
    from fusepass.ops.attention import fused_attention

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    B, H, N, D = 1, 2, 64, 16
    seg = torch.tensor([[0] * 20 + [1] * 44])
    mask = segment_mask(seg)
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    blockmap.stats.clear()
    out = fused_attention(q, k, v, masks=[mask], mask_expr="j <= i")
    out.sum().backward()
    assert blockmap.stats == {"computed": 1, "reused": 2}
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = dense_attention(*leaves, [], [mask], None, D ** -0.5, 0.0, 0.0, -math.inf, "j <= i", [])
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    for t, r in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5)
    # A changed mask (new version) is classified again, never served stale classes.
    mask[:, :, :, :8] = False
    blockmap.stats.clear()
    out2 = fused_attention(q, k, v, masks=[mask], mask_expr="j <= i")
    out2.sum().backward()
    assert blockmap.stats == {"computed": 1, "reused": 2}
    ref2, _ = dense_attention(*(t.detach().double() for t in (q, k, v)), [], [mask], None, D ** -0.5, 0.0, 0.0,
                              -math.inf, "j <= i", [])
    torch.testing.assert_close(out2.double(), ref2, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_kept_classes_die_with_the_mask():
    mask = torch.rand(1, 1, 32, 32) > 0.5
    blockmap.data_classes([mask], 32, 32, 16, 16, store=True)
    key = blockmap._key([mask], 32, 32)
    assert key in blockmap._data_cache
    del mask
    assert key not in blockmap._data_cache


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_document_mask_matches_sdpa_and_captures():
    import torch.nn.functional as F

    from fusepass.ops.attention import fused_attention

    dev = "cuda"
    B, H, N, D = 2, 4, 2048, 64
    bounds = torch.tensor([0, 300, 900, 1500, N])
    seg = torch.bucketize(torch.arange(N), bounds[1:], right=True).to(dev).expand(B, N)
    mask = segment_mask(seg) & torch.ones(N, N, dtype=torch.bool, device=dev).tril()
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = fused_attention(q, k, v, masks=[mask])
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), attn_mask=mask)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    gr = torch.autograd.grad(ref, (q, k, v), do.float())
    for a, r in zip(g, gr):
        assert ((a.float() - r).norm() / r.norm()).item() < 1e-2
    # Under CUDA-graph capture: nothing is kept or reused, replays follow new mask contents.
    static_mask = mask.clone()
    fused_attention(q.detach(), k.detach(), v.detach(), masks=[static_mask])  # warm up (compile)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = fused_attention(q.detach(), k.detach(), v.detach(), masks=[static_mask])
    static_mask.copy_(segment_mask(seg.flip(-1)))
    graph.replay()
    ref2 = F.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)), attn_mask=static_mask)
    assert ((gout.float() - ref2).norm() / ref2.norm()).item() < 1e-2
