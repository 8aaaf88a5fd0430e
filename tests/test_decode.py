"""The decode family (split-KV, query heads packed per key/value head) against float64.

Under Triton's interpreter on CPU at small shapes (the GPU run carries the ``gpu`` marker):
odd key lengths, one key, keys not a multiple of the split, rows that see no key, GQA 1/4/8,
softcap, sliding windows from a cache offset, padding masks (bool and additive), a cache
longer than its filled part (strided K/V), and the dispatcher's choice of family.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_close_to_reference  # noqa: E402
from fusepass.autotune.config import DecodeConfig  # noqa: E402
from fusepass.kernels import decode, launch_common  # noqa: E402
from fusepass.ops.dispatch import forward_call  # noqa: E402
from kernel_cases import Case, dense_attention  # noqa: E402

CAUSAL = "j <= i + (N - M)"
WINDOW = "(j <= i + (N - M)) & (j > i + (N - M) - a0)"


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    # Every output element the kernels forget to write is NaN.
    monkeypatch.setattr(launch_common, "poison_outputs", True)


def check(case: Case, config=None, device="cpu"):
    q, k, v, biases, masks, seed = case.tensors(device)
    feats = (None, case.D ** -0.5, case.softcap, 0.0, case.fill, case.expr, list(case.args))
    call = forward_call(q, k, v, biases, masks, *feats)
    out, lse = decode.attention_forward(call, config)
    ref, ref_lse = dense_attention(q.double(), k.double(), v.double(), [b.double() for b in biases], masks, *feats)
    eager, _ = dense_attention(q, k, v, biases, masks, *feats)
    assert_close_to_reference(out, eager, ref, name="out")
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4, equal_nan=True)
    return out


SPLITS = DecodeConfig(BLOCK_N=32, num_splits=3, num_warps=4, num_stages=1)

CASES = [
    Case(B=2, Hq=2, Hkv=2, M=1, N=100, D=16),  # plain multi-head, ragged last tile
    Case(B=1, Hq=8, Hkv=2, M=1, N=1, D=16),  # one key
    Case(B=2, Hq=8, Hkv=1, M=1, N=97, D=32, Dv=16),  # GQA 8, Dv != D
    Case(B=1, Hq=4, Hkv=1, M=3, N=70, D=16, expr=CAUSAL),  # a few queries, causal from the cache offset
    Case(B=2, Hq=4, Hkv=2, M=2, N=90, D=16, expr=WINDOW, args=(20,)),  # sliding window
    Case(B=1, Hq=4, Hkv=1, M=1, N=77, D=16, softcap=5.0),
    Case(B=2, Hq=4, Hkv=2, M=1, N=65, D=16, mask_shapes=((2, 1, 1, 65),)),  # a key-padding bool mask
    Case(B=2, Hq=4, Hkv=2, M=4, N=50, D=16, bias_shapes=((2, 1, 4, 50),)),  # a learned / additive bias
    Case(B=1, Hq=2, Hkv=1, M=2, N=40, D=16, expr="j < a0", args=(0,)),  # no visible key: NaN rows, as eager
    Case(B=1, Hq=2, Hkv=1, M=2, N=40, D=16, expr="j < a0", args=(0,), fill=-1e9),  # finite fill: mean of V
    Case(B=1, Hq=4, Hkv=2, M=1, N=64, D=16, dtype=torch.bfloat16, expr=CAUSAL),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c.B}_G{c.Hq // c.Hkv}_M{c.M}_N{c.N}_{c.expr[:6]}")
@pytest.mark.parametrize("config", [None, SPLITS], ids=["default", "3splits"])
def test_decode_matches_float64(case, config):
    check(case, config)


def test_padding_masks_from_left_padded_prompts():
    """A batch of prompts of which one is left-padded: an additive finfo.min key mask with a
    causal predicate, one new query per sequence (the transformers decode step)."""
    B, Hq, Hkv, N, D = 2, 4, 2, 48, 16
    torch.manual_seed(0)
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    pad = torch.zeros(B, 1, 1, N)
    pad[0, :, :, :7] = torch.finfo(torch.float32).min  # the first prompt is left-padded by 7
    feats = (None, D ** -0.5, 0.0, 0.0, -math.inf, CAUSAL, [])
    out, _ = decode.attention_forward(forward_call(q, k, v, [pad], [], *feats), SPLITS)
    ref, _ = dense_attention(q.double(), k.double(), v.double(), [pad.double()], [], *feats)
    eager, _ = dense_attention(q, k, v, [pad], [], *feats)
    assert_close_to_reference(out, eager, ref, name="out")


def test_a_cache_longer_than_its_filled_part():
    """K and V are the filled part of a static cache: a strided slice, not a copy."""
    B, Hq, Hkv, D, filled = 1, 4, 2, 16, 45
    cache_k, cache_v = torch.randn(B, Hkv, 128, D), torch.randn(B, Hkv, 128, D)
    k, v = cache_k[:, :, :filled], cache_v[:, :, :filled]
    q = torch.randn(B, Hq, 1, D)
    feats = (None, D ** -0.5, 0.0, 0.0, -math.inf, "", [])
    out, _ = decode.attention_forward(forward_call(q, k, v, [], [], *feats), SPLITS)
    ref, _ = dense_attention(q.double(), k.double(), v.double(), [], [], *feats)
    eager, _ = dense_attention(q, k, v, [], [], *feats)
    assert_close_to_reference(out, eager, ref, name="out")


def test_the_dispatcher_picks_the_family_by_shape(monkeypatch):
    """Short queries against long keys run the decode family; a prefill-shaped call the prefill
    kernel; dropout (training) the prefill kernel too.  The counter is the launchers' own."""
    from fusepass.ops.attention import fused_attention

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    N = decode.MIN_KV_LEN
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, N, 16), torch.randn(1, 2, N, 16)
    before = dict(launch_common.launches)
    fused_attention(q, k, v)
    assert launch_common.launches["decode"] == before.get("decode", 0) + 1
    assert launch_common.launches["fwd"] == before.get("fwd", 0)
    assert decode.refusal(forward_call(q, k, v, [], [], None, 1.0, 0.0, 0.0, -math.inf, "", [])) is None
    long_q = torch.randn(1, 4, 40, 16)
    assert "query length" in decode.refusal(forward_call(long_q, k, v, [], [], None, 1.0, 0.0, 0.0, -math.inf, "", []))
    monkeypatch.setattr(decode, "_last_step", {})
    short_k = forward_call(q, k[:, :, :100], v[:, :, :100], [], [], None, 1.0, 0.0, 0.0, -math.inf, "", [])
    assert "key length 100" in decode.refusal(short_k)
    assert decode.refusal(short_k) is not None  # the same length again: not growing
    drop = forward_call(q, k, v, [], [], torch.tensor(1), 1.0, 0.0, 0.1, -math.inf, "", [])
    assert decode.refusal(drop) == "dropout (training)"


def test_a_growing_cache_below_the_floor_runs_the_decode_family(monkeypatch):
    """Decode steps add a key per call: below MIN_KV_LEN the first call runs the prefill kernel,
    the next (a longer cache, same structure) the decode family, and so does a repeated length
    from then on (the next layer's call of the same step)."""
    from fusepass.ops.attention import fused_attention

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(decode, "_last_step", {})
    q = torch.randn(1, 4, 1, 16)
    cache_k, cache_v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    seen = []
    for N in (30, 31, 32, 32):
        before = dict(launch_common.launches)
        k, v = cache_k[:, :, :N], cache_v[:, :, :N]
        out = fused_attention(q, k, v, mask_expr=CAUSAL)
        seen.append("decode" if launch_common.launches["decode"] > before.get("decode", 0) else "prefill")
        ref, _ = dense_attention(q.double(), k.double(), v.double(), [], [], None, 0.25, 0.0, 0.0, -math.inf, CAUSAL, [])
        eager, _ = dense_attention(q, k, v, [], [], None, 0.25, 0.0, 0.0, -math.inf, CAUSAL, [])
        assert_close_to_reference(out, eager, ref, name=f"N={N}")
    assert seen == ["prefill", "decode", "decode", "decode"]


def test_explain_names_the_family():
    import fusepass

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v

    N = decode.MIN_KV_LEN
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, N, 16), torch.randn(1, 2, N, 16)
    report = fusepass.explain(attention, q, k, v, options={"inner": "aot_eager", "interpret": True})
    assert report.sites[0].runs_on == "triton, decode family (split-KV)"
    torch._dynamo.reset()  # else the second shape compiles with symbolic sizes (decided per call)
    q = torch.randn(1, 2, 64, 16)
    report = fusepass.explain(attention, q, k, v, options={"inner": "aot_eager", "interpret": True})
    assert report.sites[0].runs_on.startswith("triton, prefill family (not decode: query length 64")
    torch._dynamo.reset()
    q = torch.randn(1, 2, 1, 16)
    report = fusepass.explain(attention, q, k[:, :, :100], v[:, :, :100], options={"inner": "aot_eager", "interpret": True})
    assert report.sites[0].runs_on.endswith("key length 100 < 4096 (1024 under CUDA graphs), and not a growing cache)")


def test_a_captured_call_takes_the_decode_family_from_the_lower_floor(monkeypatch):
    """Under CUDA-graph capture only GPU time repeats, and there the decode family wins from
    MIN_KV_LEN_CAPTURED keys.  A kernel cannot be loaded while a stream captures, so: the first
    uncaptured call of a signature between the two floors runs the decode family (what a
    capture's warm-up call loads), later uncaptured ones the prefill kernel, captured ones the
    decode family; a signature captured before any uncaptured call, and lengths below the
    floor, stay with the prefill kernel.  A runner bound in one state does not serve the other
    (the capture state is in its key)."""
    from fusepass.ops import dispatch
    from fusepass.ops.attention import fused_attention

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(decode, "_last_step", {})
    monkeypatch.setattr(decode, "_ran_uncaptured", {})
    captured = [False]
    monkeypatch.setattr(decode, "capturing", lambda q: captured[0])
    q = torch.randn(1, 4, 1, 16)
    N = decode.MIN_KV_LEN_CAPTURED
    k, v = torch.randn(1, 2, 2 * N, 16), torch.randn(1, 2, 2 * N, 16)
    feats = ([], [], None, 0.25, 0.0, 0.0, -math.inf, CAUSAL, [])

    def family(n, heads=2):
        qh, kh, vh = q[:, : 2 * heads], k[:, :heads, :n], v[:, :heads, :n]
        before = launch_common.launches["decode"]
        out = fused_attention(qh, kh, vh, mask_expr=CAUSAL)
        ref, _ = dense_attention(qh.double(), kh.double(), vh.double(), *feats)
        eager, _ = dense_attention(qh, kh, vh, *feats)
        assert_close_to_reference(out, eager, ref, name=f"N={n} captured={captured[0]}")
        return "decode" if launch_common.launches["decode"] > before else "prefill"

    assert [family(N) for _ in range(3)] == ["decode", "prefill", "prefill"]
    assert "1024 under CUDA graphs" in decode.refusal(forward_call(q, k[:, :, :N], v[:, :, :N], *feats))
    captured[0] = True
    assert [family(N) for _ in range(2)] == ["decode", "decode"]
    assert decode.refusal(forward_call(q, k[:, :, :N], v[:, :, :N], *feats)) is None
    # Another structure (one key/value head), captured first: its decode kernels were never loaded.
    assert [family(N, heads=1) for _ in range(2)] == ["prefill", "prefill"]
    keys = []
    for state in (False, True):
        captured[0] = state
        keys.append(dispatch.runner_key(q, k, v, *feats[:2], None, *feats[3:], ""))
    assert keys[0] != keys[1]


@pytest.mark.gpu
def test_gpu_a_captured_static_cache_runs_the_decode_family(monkeypatch):
    """On CUDA: a static cache of 2048 keys runs the decode family on its first uncaptured call
    (loading its kernels), the prefill kernel on the next, and the decode family again when
    captured into a CUDA graph; every output matches float64."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fusepass.ops import dispatch
    from fusepass.ops.attention import fused_attention

    for table in ("_runners", "_growers"):
        monkeypatch.setattr(dispatch, table, {})
    monkeypatch.setattr(decode, "_last_step", {})
    monkeypatch.setattr(decode, "_ran_uncaptured", {})
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(2, 8, 1, 128, device=dev, dtype=dt)
    k, v = (torch.randn(2, 2, 2048, 128, device=dev, dtype=dt) for _ in range(2))
    feats = ([], [], None, 128 ** -0.5, 0.0, 0.0, -math.inf, CAUSAL, [])
    ref, _ = dense_attention(q.double(), k.double(), v.double(), *feats)
    eager, _ = dense_attention(q, k, v, *feats)
    seen = []
    for captured in (False, False, True):
        before = dict(launch_common.launches)
        if captured:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fused_attention(q, k, v, mask_expr=CAUSAL)
            graph.replay()
            torch.cuda.synchronize()
        else:
            out = fused_attention(q, k, v, mask_expr=CAUSAL)
        seen.append("decode" if launch_common.launches["decode"] > before.get("decode", 0) else "prefill")
        assert_close_to_reference(out, eager, ref, name=f"call {len(seen)}")
    assert seen == ["decode", "prefill", "decode"]


def test_many_batch_and_key_value_heads_lower_the_floor(monkeypatch):
    """With MANY_PAIRS (batch x key/value heads) or more the decode family serves from
    MIN_KV_LEN_MANY_PAIRS keys, static shapes included; with fewer the floor stays."""
    from fusepass.ops.attention import fused_attention

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(decode, "_last_step", {})
    N, Hkv = decode.MIN_KV_LEN_MANY_PAIRS, 8
    B = decode.MANY_PAIRS // Hkv
    q = torch.randn(B, 2 * Hkv, 1, 16)
    k, v = torch.randn(B, Hkv, N, 16), torch.randn(B, Hkv, N, 16)
    feats = ([], [], None, 0.25, 0.0, 0.0, -math.inf, CAUSAL, [])
    before = launch_common.launches["decode"]
    out = fused_attention(q, k, v, mask_expr=CAUSAL)
    assert launch_common.launches["decode"] == before + 1
    ref, _ = dense_attention(q.double(), k.double(), v.double(), *feats)
    eager, _ = dense_attention(q, k, v, *feats)
    assert_close_to_reference(out, eager, ref, name="many pairs")
    assert decode.refusal(forward_call(q, k, v, *feats)) is None
    few = forward_call(q[: B // 2], k[: B // 2], v[: B // 2], *feats)
    assert decode.refusal(few) == f"key length {N} < {decode.MIN_KV_LEN} ({decode.MIN_KV_LEN_CAPTURED} under CUDA graphs), and not a growing cache"
    short = forward_call(q, k[:, :, : N - 1], v[:, :, : N - 1], *feats)
    assert decode.refusal(short) == f"key length {N - 1} < {N}, and not a growing cache"


@pytest.mark.parametrize("N", [70, 200])
def test_one_split_is_one_launch_with_the_two_kernels_numbers(monkeypatch, N):
    """When the keys take one split (a short cache, or as many (batch, key/value head) pairs as
    programs) attn_decode_single walks them and finishes the rows in one launch, with no
    partial buffers: bitwise the split + combine kernels' output on that one split."""
    from fusepass.kernels import launcher, render

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    names = []
    real = launcher.Launcher.__call__
    monkeypatch.setattr(launcher.Launcher, "__call__", lambda self, *a, **kw: names.append(self.name) or real(self, *a, **kw))
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, N, 16), torch.randn(2, 2, N, 16)
    pad = torch.zeros(2, 1, 1, N)
    pad[1, ..., :9] = torch.finfo(torch.float32).min
    call = forward_call(q, k, v, [pad], [], None, 0.25, 0.0, 0.0, -math.inf, CAUSAL, [])
    one = DecodeConfig(BLOCK_N=32, num_splits=1, num_warps=4, num_stages=1)
    out, lse = decode.attention_forward(call, one)
    assert names == ["attn_decode_single"]
    feats = ([pad], [], None, 0.25, 0.0, 0.0, -math.inf, CAUSAL, [])
    ref, _ = dense_attention(q.double(), k.double(), v.double(), [pad.double()], *feats[1:])
    eager, _ = dense_attention(q, k, v, *feats)
    assert_close_to_reference(out, eager, ref, name=f"one split N={N}")
    plan = decode._plans.get(launch_common.plan_key(call, call.structure, one), None)
    at = decode._Launch.of(call, plan)
    out2, lse2 = torch.empty_like(out), torch.empty_like(lse)
    parts = torch.empty(at.parts_numel)
    extras = launch_common.extra_args([pad], [], [])
    with render.interpreting():
        plan.launch_split(at.split_grid, q, k, v, parts, at.per_split, *extras, tail=at.tail)
        plan.launch_combine(at.combine_grid, q, k, v, out2, lse2, parts, *at.out_strides, *extras, tail=at.tail)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_split_count_follows_the_sms_and_the_key_length(monkeypatch):
    monkeypatch.setattr(decode, "_sm_count", lambda device: 132)
    q = torch.randn(8, 32, 1, 128)
    k = torch.randn(8, 8, 1, 128).expand(8, 8, 4096, 128)
    cfg = decode.default_config(forward_call(q, k, k, [], [], None, 1.0, 0.0, 0.0, -math.inf, "", []))
    assert cfg.num_splits == 3  # 132 programs over 64 (batch, key/value head) pairs
    one = decode.default_config(forward_call(q[:1], k[:1], k[:1], [], [], None, 1.0, 0.0, 0.0, -math.inf, "", []))
    assert one.num_splits == 33  # few pairs (8): 2 x 132 programs
    cfg = dataclasses.replace(cfg, BLOCK_N=128)
    for N in (1, 128, 4096, 131072):
        splits, per_split = decode.splits_for(N, cfg)
        n_tiles = -(-N // 128)
        assert 1 <= splits <= cfg.num_splits and (splits - 1) * per_split < n_tiles <= splits * per_split
        assert splits == 1 or per_split >= decode.MIN_TILES_PER_SPLIT


def test_a_growing_cache_reuses_one_plan(monkeypatch):
    """A decode step adds one key: the plan (kernel, tiles, constants) is made once, and every
    length is still right."""
    monkeypatch.setattr(decode, "_plans", decode.PlanCache())
    q = torch.randn(1, 4, 1, 16)
    cache_k, cache_v = torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16)
    feats = (None, 0.25, 0.0, 0.0, -math.inf, CAUSAL, [])
    for N in (61, 62, 63, 64, 65):
        k, v = cache_k[:, :, :N], cache_v[:, :, :N]
        out, _ = decode.attention_forward(forward_call(q, k, v, [], [], *feats), SPLITS)
        ref, _ = dense_attention(q.double(), k.double(), v.double(), [], [], *feats)
        eager, _ = dense_attention(q, k, v, [], [], *feats)
        assert_close_to_reference(out, eager, ref, name=f"out N={N}")
    assert len(decode._plans._plans) == 1


@pytest.mark.parametrize("template", ["attention_decode.py.jinja", "attention_fwd.py.jinja"])
def test_rows_past_m_never_start_the_finite_fill_walk(template):
    """With a finite fill, a row that sees no key is recomputed as the mean of V over every key,
    a walk over the whole cache.  The decode family packs G * M query rows into a tile of at
    least 16, so most of its rows are padding (offs_m = M): counted as rows that see nothing,
    they started that walk on every call (13.7 µs of a 26 µs decode call on the H200, eighth
    session's profile).  Outputs cannot show it (padding rows store nothing), so this reads the
    rendered condition: only rows below M may start the walk."""
    from fusepass.kernels import render
    from fusepass.kernels.spec import KernelSpec

    spec = KernelSpec(expr="a0 >= j", n_args=1, finite_fill=True, head_dim=128, v_head_dim=128)
    src = render.render(template, spec.render_params())
    dead = [line.strip() for line in src.splitlines() if line.strip().startswith("dead =")]
    assert dead and set(dead) == {"dead = (l_i == 0.0) & (offs_m < M)"}  # each kernel's epilogue


def _counted_growers(monkeypatch) -> list:
    """Fresh runner and grower tables, and the key lengths of the calls growers serve."""
    from fusepass.ops import dispatch

    for table in ("_runners", "_growers"):
        monkeypatch.setattr(dispatch, table, {})
    monkeypatch.setattr(decode, "_last_step", {})
    served = []
    real = decode.grower

    def grower(call):
        run = real(call)
        return lambda *tensors: served.append(tensors[1].shape[2]) or run(*tensors)

    monkeypatch.setattr(decode, "grower", grower)
    return served


def _grow(q, k, v, pad, steps: int, expr: str = CAUSAL, position=None, layers: int = 1):
    """K, V and the padding bias one key longer per call, as DynamicCache hands them over (or, with
    ``position``, a cache of fixed length whose predicate ``expr`` reads the step's position as
    its mask argument, as StaticCache's steps do): each call through dispatch.forward, checked
    against the decode family's full path (bitwise, from the second step on: the first ran the
    prefill family, not yet a decode step) and against float64.  ``layers``: calls per step,
    as the layers of a model make them (one signature, L times).  Returns the last K, V, bias
    and features."""
    from fusepass.ops import dispatch

    B, Hkv, _, D = k.shape
    new = dict(device=q.device, dtype=q.dtype)
    for step in range(steps):
        if position is None:
            k = torch.cat([k, torch.randn(B, Hkv, 1, D, **new)], 2)
            v = torch.cat([v, torch.randn(B, Hkv, 1, D, **new)], 2)
            pad = torch.cat([pad, torch.zeros(B, 1, 1, 1, **new)], 3)
            args = [k.shape[2] - 1] if "a0" in expr else []
        else:
            args = [position + step]
        feats = (None, D ** -0.5, 0.0, 0.0, -math.inf, expr, args)
        for _ in range(layers):
            out, lse = dispatch.forward(q, k, v, [pad], [], *feats)
        if step:
            want = decode.attention_forward(forward_call(q, k, v, [pad], [], *feats))
            assert torch.equal(out, want[0]) and torch.equal(lse, want[1]), f"step {step}"
        ref, _ = dense_attention(q.double(), k.double(), v.double(), [pad.double()], [], *feats)
        eager, _ = dense_attention(q, k, v, [pad], [], *feats)
        assert_close_to_reference(out, eager, ref, name=f"step {step}")
    return k, v, pad, feats


def test_a_growing_cache_is_served_by_one_grower_from_its_third_step(monkeypatch):
    """DynamicCache's steps: K, V and the padding bias grow by one key per call, so every call
    has a new signature (no runner).  The second length binds a grower (ops/dispatch.py); from
    the third step on it serves the call without building it, with the full path's outputs
    bitwise, and a call the grower's key cannot vouch for is validated (and refused) as before."""
    from fusepass.ops import dispatch

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_binds", lambda q: True)  # on CPU: the interpreter stands in for CUDA
    served = _counted_growers(monkeypatch)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, Hq, 1, D)
    k, v = torch.randn(B, Hkv, 29, D), torch.randn(B, Hkv, 29, D)
    pad = torch.zeros(B, 1, 1, 29)
    pad[1, ..., :5] = torch.finfo(torch.float32).min  # the second prompt is left-padded
    k, v, pad, feats = _grow(q, k, v, pad, 5)
    assert served == [32, 33, 34]  # lengths 30 and 31 took the full path; 31 bound the grower
    # A bias that spans neither one key nor all of them has another growth key: validated, refused.
    with pytest.raises(ValueError, match="does not broadcast"):
        dispatch.forward(q, k, v, [pad[..., 1:]], [], *feats)
    with pytest.raises(ValueError, match="disagree"):  # K and V of different lengths
        dispatch.forward(q, k, v[:, :, 1:], [pad], [], *feats)
    assert served == [32, 33, 34]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_moving_cache_position_is_served_by_one_grower(monkeypatch, cache, layers):
    """transformers' decode steps read their causal mask as ``a0 >= j``, with the cache position
    as the mask argument: it moves by one per step, with the cache (DynamicCache) or inside a
    cache of fixed length (a StaticCache-like one: only the position moves).  A moving argument
    must neither make a new decode plan per step nor keep the grower from binding: from the
    third step on the grower serves, bitwise equal to the full path, with one decode plan.
    With two layers, the second layer's call of each step has the first's signature: the
    grower serves it too (once the structure has moved), not a runner bound to that one step."""
    from fusepass.ops import dispatch

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_binds", lambda q: True)
    monkeypatch.setattr(decode, "_plans", type(decode._plans)())
    served = _counted_growers(monkeypatch)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, Hq, 1, D)
    N = 29 if cache == "dynamic" else 40
    k, v = torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    pad = torch.zeros(B, 1, 1, N)
    pad[1, ..., :5] = torch.finfo(torch.float32).min
    _grow(q, k, v, pad, 5, expr="a0 >= j", position=None if cache == "dynamic" else 20, layers=layers)
    lengths = [31, 32, 33, 34] if cache == "dynamic" else [40] * 4
    # The second step's first call finds the structure moved and binds the grower, which serves
    # the calls after it: that step's other layers, then every layer of every later step.
    assert served == [lengths[0]] * (layers - 1) + [n for n in lengths[1:] for _ in range(layers)]
    assert len(decode._plans._plans) == 1


def test_a_structure_binds_a_grower_only_once_it_moves(monkeypatch):
    """Growers are tried before runners (ops/dispatch.forward), so one must exist only for a
    structure that takes decode steps: a short query against keys that never change (a
    cross-attention) repeats its call and keeps its runner's family, the size rule's (here the
    prefill kernel: 29 keys are below every floor).  The same structure moving later (a cache
    position that starts to advance) then binds the grower, which serves from its next call."""
    from fusepass.ops import dispatch

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_binds", lambda q: True)
    served = _counted_growers(monkeypatch)
    q = torch.randn(1, 4, 1, 16)
    k, v = torch.randn(1, 2, 29, 16), torch.randn(1, 2, 29, 16)
    feats = (None, 0.25, 0.0, 0.0, -math.inf, "a0 >= j", [20])
    for _ in range(4):
        before = launch_common.launches["decode"]
        dispatch.forward(q, k, v, [], [], *feats)
        assert launch_common.launches["decode"] == before  # the prefill family, every time
    gkey = dispatch.growth_key(q, k, v, [], [], *feats, "")
    assert dispatch._growers[gkey] is dispatch._SEEN and served == []
    for position in (21, 22, 23):
        dispatch.forward(q, k, v, [], [], *feats[:-1], [position])
    assert served == [29, 29]  # 21 moved the structure (the full path) and bound the grower


def test_a_cache_above_the_floor_binds_its_grower(monkeypatch):
    """Above the size rule's floor the decode family serves a call without tracking its steps
    (decode.serves), so a growing cache there never counts as moved: its grower must bind all
    the same (on the structure's first call: the family is the size rule's), or every step
    takes the full path."""
    from fusepass.ops import dispatch

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_binds", lambda q: True)
    monkeypatch.setattr(decode, "MIN_KV_LEN", 32)  # the floor, low enough for the interpreter
    served = _counted_growers(monkeypatch)
    B, Hq, Hkv, D = 1, 4, 2, 16
    q = torch.randn(B, Hq, 1, D)
    k, v = torch.randn(B, Hkv, 40, D), torch.randn(B, Hkv, 40, D)
    pad = torch.zeros(B, 1, 1, 40)
    _grow(q, k, v, pad, 4)
    assert served == [42, 43, 44]  # the first call (41 keys) bound the grower
    assert not decode.moved(forward_call(q, k, v, [pad], [], None, D ** -0.5, 0.0, 0.0, -math.inf, CAUSAL, []))


@pytest.mark.gpu
def test_gpu_growers_serve_a_growing_cache(monkeypatch):
    """On CUDA (where growers bind for real): a DynamicCache-like cache grows by one key per call,
    with a left-padding bias; from the third length on a grower serves the call, bitwise equal
    to the full path and close to float64."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    served = _counted_growers(monkeypatch)
    dev, dt, B, Hq, Hkv, D = "cuda", torch.bfloat16, 2, 8, 2, 128
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    k, v = (torch.randn(B, Hkv, 1000, D, device=dev, dtype=dt) for _ in range(2))
    pad = torch.zeros(B, 1, 1, 1000, device=dev, dtype=dt)
    pad[1, ..., :100] = torch.finfo(dt).min
    _grow(q, k, v, pad, 5)
    assert served == [1003, 1004, 1005]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("G,M,N,D,expr", [(4, 1, 4096, 128, CAUSAL), (8, 1, 33000, 128, ""), (1, 1, 1000, 64, ""),
                                          (4, 4, 2047, 256, WINDOW), (8, 2, 5000, 80, CAUSAL)])
def test_gpu_decode(dtype, G, M, N, D, expr):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    case = Case(B=3, Hq=2 * G, Hkv=2, M=M, N=N, D=D, dtype=dtype, expr=expr, args=(700,) if expr == WINDOW else (),
                softcap=30.0 if D == 80 else 0.0, mask_shapes=((3, 1, 1, N),) if N == 5000 else ())
    check(case, device="cuda")
    one = dataclasses.replace(case, B=1, mask_shapes=tuple((1, *m[1:]) for m in case.mask_shapes))
    check(one, DecodeConfig(BLOCK_N=64, num_splits=7, num_warps=4, num_stages=2), device="cuda")
