"""The generated Triton kernels under Triton's interpreter (CPU), against a float64 reference.

Every output buffer is poisoned with NaN before the kernels run (launch_common.poison_outputs),
so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytest.importorskip("triton")

from fusepass.autotune.config import BackwardConfig, ForwardConfig  # noqa: E402
from fusepass.kernels import blockmap, launch_common, render  # noqa: E402
from fusepass.kernels.predicate_triton import to_triton  # noqa: E402
from fusepass.ops.dispatch import backward_call, forward_call  # noqa: E402
from fusepass.kernels.support import fallback_reason, fp32_dot_precision  # noqa: E402
from fusepass.masks.predicate import dense_keep  # noqa: E402

import kernel_cases  # noqa: E402
from kernel_cases import Case, dense_attention, run_case  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_and_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusepass-cache"))
    monkeypatch.setattr(launch_common, "poison_outputs", True)
    yield


SHAPES = [  # (M, N, D)
    (1, 17, 16),
    (17, 1, 40),
    (17, 64, 64),
    (64, 129, 80),
    (129, 17, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,N,D", SHAPES)
def test_shapes(M, N, D, dtype):
    run_case(Case(M=M, N=N, D=D, dtype=dtype))


CAUSAL = "j <= i + (N - M)"
FEATURES = {
    "causal": Case(M=64, N=64, expr=CAUSAL, dtype=torch.bfloat16),
    "causal_cross_m_gt_n_finite_fill": Case(M=70, N=33, expr=CAUSAL, fill=torch.finfo(torch.float16).min, dtype=torch.float16),
    "causal_cross_m_gt_n_inf_fill": Case(M=70, N=33, expr=CAUSAL, dtype=torch.float32),
    "sliding_window": Case(M=100, N=100, expr="(j <= i) & (i - j < a0)", args=(20,), dtype=torch.bfloat16),
    "floor_div_negative": Case(M=40, N=50, expr="((i - j) // 3) % 2 == 0", dtype=torch.float32),
    "pred_reads_head": Case(Hq=4, Hkv=4, M=33, N=40, expr="(j <= i) | (h % 2 == 0)", dtype=torch.float32),
    "softcap": Case(M=33, N=47, D=40, softcap=2.0, dtype=torch.bfloat16),
    "bias_full_store": Case(B=2, M=33, N=40, bias_shapes=((2, 2, 33, 40),), dtype=torch.float32),
    "bias_broadcasts": Case(B=2, M=33, N=40, bias_shapes=((1, 2, 33, 40), (2, 1, 1, 40), (33, 1), (2, 2, 1, 1))),
    "bias_no_grad": Case(M=20, N=20, bias_shapes=((1, 1, 20, 20),), bias_grad=False, dtype=torch.float16),
    "masks_broadcast": Case(B=2, M=33, N=40, mask_shapes=((2, 1, 33, 40), (40,)), dtype=torch.bfloat16),
    "mask_finite_fill": Case(B=2, M=20, N=24, mask_shapes=((2, 1, 20, 24),), fill=-1e9),
    "gqa": Case(B=2, Hq=6, Hkv=2, M=40, N=50, D=64, expr=CAUSAL, dtype=torch.bfloat16),
    "dv_differs": Case(M=33, N=40, D=40, Dv=24, dtype=torch.float16),
    "transposed_strides": Case(B=2, Hq=4, Hkv=2, M=33, N=40, transposed=True, dtype=torch.bfloat16),
    "dropout": Case(M=40, N=50, dropout_p=0.25, dtype=torch.float32),
    "everything": Case(B=2, Hq=4, Hkv=2, M=45, N=37, D=40, Dv=24, expr=CAUSAL, fill=torch.finfo(torch.bfloat16).min,
                       bias_shapes=((1, 4, 45, 37),), mask_shapes=((2, 1, 1, 37),), softcap=5.0, dropout_p=0.1,
                       dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_features(name):
    run_case(FEATURES[name])


@contextlib.contextmanager
def _cuda_fp32_matmul(tf32: bool, api: str):
    """CUDA fp32 matmuls set to TF32 or IEEE through ``api`` ("fp32_precision", torch >= 2.9, or
    the legacy "allow_tf32"), and restored afterwards through the same API."""
    matmul = torch.backends.cuda.matmul
    old = getattr(matmul, api)
    setattr(matmul, api, ("tf32" if tf32 else "ieee") if api == "fp32_precision" else tf32)
    try:
        yield
    finally:
        setattr(matmul, api, old)


def _has_fp32_precision() -> bool:
    return getattr(torch.backends.cuda.matmul, "fp32_precision", None) is not None


def _preferred_api() -> str:
    # Once the new API is used, reading allow_tf32 raises on torch >= 2.9: use the new one there.
    return "fp32_precision" if _has_fp32_precision() else "allow_tf32"


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_dot_precision_follows_torch_setting(tf32):
    want = "tf32" if tf32 else "ieee"
    with _cuda_fp32_matmul(tf32, _preferred_api()):
        assert fp32_dot_precision() == want
    if _has_fp32_precision():
        # The global setting, inherited while the matmul setting is unset ("none").
        backends, matmul = torch.backends, torch.backends.cuda.matmul
        old_global, old_matmul = backends.fp32_precision, matmul.fp32_precision
        try:
            matmul.fp32_precision = "none"
            backends.fp32_precision = want
            assert fp32_dot_precision() == want
        finally:
            backends.fp32_precision = old_global
            matmul.fp32_precision = old_matmul


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_follows_tf32_setting(tf32):
    """fp32 kernels use TF32 dots exactly when PyTorch's CUDA fp32 matmuls do, set through the
    API this torch has (torch 2.13: reading the legacy allow_tf32 after the new setting raises)."""
    from fusepass.kernels.spec import KernelSpec

    q = torch.randn(1, 1, 4, 16)
    with _cuda_fp32_matmul(tf32, _preferred_api()):
        assert KernelSpec.for_call(forward_call(q, q, q, [], [], None, 1.0, 0.0, 0.0, -math.inf, "", [])).precision == ("tf32" if tf32 else "ieee")


def test_fp32_scores_are_summed_in_fp64_and_rounded_once():
    """Unscaled fp32 scores near 30 (scale 1, D = 128): summed in fp32 along D the score is off
    by ~1e-5 and so is every exponent (lse off by 1.6e-5, six ulps, on this interpreter); summed
    in fp64 and rounded once, lse is within an ulp of float64's and the gradients follow."""
    from fusepass.kernels.backward import attention_backward
    from fusepass.kernels.forward import attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 33, 128, generator=g) for _ in range(4))
    with _cuda_fp32_matmul(False, _preferred_api()):
        call = forward_call(q, k, v, [], [], None, 1.0, 0.0, 0.0, -math.inf, "", [])
        out, lse = attention_forward(call)
        grads = attention_backward(backward_call(do, q, k, v, out, lse, [], [], None, 1.0, 0.0, 0.0, -math.inf, "",
                                                 [], []))[:3]
    s = q.double() @ k.double().transpose(-1, -2)
    assert s.abs().max() > 25
    lse64 = torch.logsumexp(s, -1)
    assert (lse.double() - lse64).abs().max() <= torch.finfo(torch.float32).eps * lse64.abs().max()
    assert (out.double() - torch.softmax(s, -1) @ v.double()).abs().max() < 2e-6
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    (torch.softmax(q64 @ k64.transpose(-1, -2), -1) @ v64).backward(do.double())
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert (got.double() - want).abs().max() < 5e-5  # |dq| reaches ~30 here: 2e-6 relative


def test_fp32_gradients_are_summed_over_tiles_with_compensation():
    """One key, so dV is the sum of dO over the query rows, tile after tile: a first tile
    summing to 1e4 and 128 tiles of 3.2 each.  Added into one fp32 running sum, each of the
    128 additions rounds at 1e4's ulp (9.8e-4): 0.024 off on this interpreter.  With Kahan's
    compensation the sum is within an ulp of the exact one."""
    from fusepass.kernels.backward import attention_backward
    from fusepass.kernels.forward import attention_forward

    M = 32 * 129
    q, k, v = torch.randn(1, 1, M, 16), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    do = torch.full((1, 1, M, 16), 0.1)
    do[:, :, :32] = 0.0
    do[:, :, 0] = 1e4
    with _cuda_fp32_matmul(False, _preferred_api()):
        call = forward_call(q, k, v, [], [], None, 0.25, 0.0, 0.0, -math.inf, "", [])
        out, lse = attention_forward(call, config=ForwardConfig(32, 32, 4, 1))
        dv = attention_backward(backward_call(do, q, k, v, out, lse, [], [], None, 0.25, 0.0, 0.0, -math.inf, "",
                                              [], []), config=BackwardConfig(32, 32, 4, 1))[2]
    exact = do.double().sum(2, keepdim=True)
    assert (dv.double() - exact).abs().max() <= torch.finfo(torch.float32).eps * exact.abs().max()


def _dropout_out(p, N=64, seed=99):
    """q = 0 makes p uniform (1/N); V = identity makes out[i, j] = keep_ij / (N (1 - p))."""
    from fusepass.kernels.forward import attention_forward

    q = torch.zeros(1, 2, 48, 16)
    k = torch.randn(1, 2, N, 16)
    v = torch.eye(N).expand(1, 2, N, N).contiguous()
    out, _ = attention_forward(forward_call(q, k, v, [], [], torch.tensor(seed), 1.0, 0.0, p, -math.inf, "", []))
    return out


def test_dropout_mask_matches_reference_hash_bitwise():
    from fusepass.ops import dropout as dr

    p, N = 0.3, 64
    out = _dropout_out(p, N)
    rows = torch.arange(2 * 48).view(1, 2, 48, 1)
    want = dr.keep_mask(99, rows, torch.arange(N).view(1, 1, 1, N), p)
    assert torch.equal(out > 0, want)
    torch.testing.assert_close(out[want], torch.full_like(out[want], 1 / (N * (1 - p))))


def test_dropout_statistics():
    p = 0.2
    out = _dropout_out(p, 64, seed=7)
    keep_rate = (out > 0).double().mean().item()
    # 6144 Bernoulli draws: 5 standard deviations of the rate is about 0.026.
    assert abs(keep_rate - (1 - p)) < 0.026
    # Unbiased: each row sums to keep_count / (N (1 - p)), whose mean is 1.
    assert abs(out.sum(-1).mean().item() - 1.0) < 0.03


def test_causal_skips_about_half_the_tiles():
    bm = blockmap.get(CAUSAL, [], 256, 256, 32, 32, "cpu")
    n = 8
    assert bm.by_row.visited() == n * (n + 1) // 2
    assert int(bm.by_row.partial_cnt.sum()) == n  # only the diagonal pays for mask arithmetic
    assert bm.by_col.visited() == bm.by_row.visited()
    # Ragged sizes: boundary tiles are partial, fully hidden ones absent.
    bm = blockmap.get(CAUSAL, [], 70, 100, 32, 32, "cpu")
    keep = (torch.arange(100)[None, :] <= torch.arange(70)[:, None] + 30)
    for r in range(3):
        for c in range(4):
            tile = keep[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
            want = 0 if not tile.any() else (2 if tile.all() and tile.shape[1] == 32 else 1)
            assert bm.classes[r, c].item() == want, (r, c)


def test_predicate_printer_keeps_python_semantics():
    src = to_triton("(i // 3 == j % -4) & ~(abs(i - j) < max(a0, 2, M))", {
        "i": "ii", "j": "jj", "M": "M", "a0": "a0", "N": "N", "b": "b", "h": "h"})
    assert "_py_floordiv(ii, 3)" in src and "_py_mod(jj, (-4))" in src
    assert "tl.maximum(tl.maximum(a0, 2), M)" in src and "tl.abs((ii - jj))" in src


def test_render_cache_and_show(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path))
    src = render.show("fwd", pred="j <= i", softcap=True, n_biases=1)
    assert "def attn_fwd" in src and "(jj <= ii)" in src and "_tanh" in src
    assert "def attn_bwd_dkdv" in render.show("bwd", head_dim=40, n_biases=1, bias_grad=("atomic_m",))
    from fusepass.kernels.spec import KernelSpec

    params = KernelSpec.from_features(pred="j <= i").render_params()
    mod = render.load("attention_fwd.py.jinja", params, interpret=True)
    assert render.load("attention_fwd.py.jinja", params, interpret=True) is mod
    files = list((tmp_path / "kernels").glob("attention_fwd_*.py"))
    assert len(files) == 1 and files[0].read_text() == render.render("attention_fwd.py.jinja", params)
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        render.render("attention_fwd.py.jinja", {k: v for k, v in params.items() if k != "softcap"})


def test_fallback_reasons():
    assert fallback_reason("cuda", torch.bfloat16, 128, 128) is None
    assert fallback_reason("cuda", torch.bfloat16, 80, 40) is None
    assert "dtype" in fallback_reason("cuda", torch.float64, 64, 64)
    assert "head dim" in fallback_reason("cuda", torch.float16, 512, 64)
    assert "mask_fill" in fallback_reason("cuda", torch.float16, 64, 64, mask_fill=-10.0)
    assert fallback_reason("cuda", torch.float16, 64, 64, mask_fill=-1e9) is None
    assert "CPU" in fallback_reason("cpu", torch.float32, 64, 64, interpret=False)
    assert fallback_reason("cpu", torch.float32, 64, 64, interpret=True) is None
    assert "capability" in fallback_reason("cuda", torch.float16, 64, 64, capability=(7, 5))
    # Softcap at any head dim runs the kernels (the GPU failures first blamed on it were narrow
    # V tiles, see test_value_tiles_are_never_narrower_than_key_tiles).
    assert fallback_reason("cuda", torch.bfloat16, 40, 17, softcap=5.0) is None


@pytest.mark.parametrize("d, dv, tile", [(64, 64, 64), (40, 17, 64), (64, 16, 64), (128, 17, 128), (16, 64, 64),
                                         (17, 40, 64), (17, 17, 64), (8, 8, 64), (64, 128, 128), (256, 40, 256)])
def test_value_tiles_are_never_narrower_than_key_tiles(d, dv, tile):
    """The V / output tile is at least 64 wide and at least the K tile's width (narrower ones
    gave wrong outputs and illegal memory accesses on the H200), and the launch, the variant
    (masked V loads) and the autotuner's shared-memory estimate all use that one width."""
    from fusepass.autotune.config import ForwardConfig, shared_memory_bytes
    from fusepass.kernels.limits import value_tile_dim
    from fusepass.kernels.spec import KernelSpec

    assert value_tile_dim(d, dv) == tile
    q, k, v = torch.empty(1, 1, 8, d), torch.empty(1, 1, 8, d), torch.empty(1, 1, 8, dv)
    spec = KernelSpec.for_call(forward_call(q, k, v, [], [], None, 1.0, 0.0, 0.0, -math.inf, "", []))
    assert launch_common.head_dims(spec)["HEAD_DIM_V_P"] == tile
    assert spec.render_params()["even_dv"] == (dv == tile)
    cfg = ForwardConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    d_tile = max(16, 1 << (d - 1).bit_length())
    assert shared_memory_bytes(cfg, d, torch.bfloat16, value_head_dim=dv) == 2 * (64 * d_tile + 2 * 64 * (d_tile + tile))


def test_op_runs_kernels_under_interpret(monkeypatch):
    """torch.ops.fusepass.attention with FUSEPASS_INTERPRET=1 runs the kernels, autograd included."""
    import fusepass.kernels.forward as kf
    from fusepass.ops.attention import fused_attention

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    calls = []
    real = kf.attention_forward
    monkeypatch.setattr(kf, "attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 20, 20, requires_grad=True)
    out = fused_attention(q, k, v, biases=[bias], mask_expr="j <= i")
    out.sum().backward()
    assert calls
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref, _ = dense_attention(*leaves[:3], [leaves[3]], [], None, 16 ** -0.5, 0.0, 0.0, -math.inf, "j <= i", [])
    ref.sum().backward()
    for t, r in zip((q, k, v, bias), leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


from kernel_cases import EMPTY_SHAPES  # noqa: E402
from fusepass.ops.dispatch import backward_call, forward_call


def _eager_empty(q, k, v, bias, mask, expr):
    """The op's formula in eager PyTorch (what a model computes), for empty problems."""
    G = q.shape[1] // k.shape[1] if k.shape[1] else 1
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) * 0.25 + bias
    keep = mask & dense_keep(expr, *s.shape, [], device=s.device)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s.float(), -1).to(v.dtype) @ v, torch.logsumexp(s.float(), -1)


def check_empty(shape, device, monkeypatch):
    """No rows, no keys or no heads: eager's values (no keys: out 0, lse -inf; gradients 0),
    through the op and its autograd, and no kernel is rendered or launched."""
    import fusepass.kernels.backward as kb
    import fusepass.kernels.forward as kf

    def no_kernel(*a, **kw):
        raise AssertionError("a kernel was loaded for an empty problem")

    monkeypatch.setattr(kf, "kernel_module", no_kernel)
    monkeypatch.setattr(kb, "kernel_module", no_kernel)
    B, Hq, Hkv, M, N = shape
    q = torch.randn(B, Hq, M, 16, device=device, requires_grad=True)
    k = torch.randn(B, Hkv, N, 16, device=device, requires_grad=True)
    v = torch.randn(B, Hkv, N, 8, device=device, requires_grad=True)
    bias = torch.randn(B, 1, M, N, device=device, requires_grad=True)
    mask = torch.ones(1, 1, 1, N, dtype=torch.bool, device=device)
    out, lse = torch.ops.fusepass.attention(q, k, v, [bias], [mask], torch.tensor(3), 0.25, 0.0, 0.0,
                                            float("-inf"), CAUSAL, [])
    want, want_lse = _eager_empty(q, k, v, bias, mask, CAUSAL)
    assert out.shape == want.shape and out.dtype == want.dtype and torch.equal(out, want)
    assert lse.shape == want_lse.shape and lse.dtype == torch.float32 and torch.equal(lse, want_lse)
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out), allow_unused=True)
    want_grads = torch.autograd.grad(want, (q, k, v, bias), torch.ones_like(want), allow_unused=True)
    for name, g, w, t in zip(("dq", "dk", "dv", "dbias"), grads, want_grads, (q, k, v, bias)):
        w = torch.zeros_like(t) if w is None else w
        assert g.shape == t.shape and torch.equal(g, w), name
    # The launchers themselves, called directly, too.
    from fusepass.kernels.backward import attention_backward
    from fusepass.kernels.forward import attention_forward

    feats = (None, 0.25, 0.0, 0.0, float("-inf"), CAUSAL, [])
    out2, lse2 = attention_forward(forward_call(q.detach(), k.detach(), v.detach(), [bias.detach()], [mask], *feats))
    assert torch.equal(out2, want) and torch.equal(lse2, want_lse)
    g2 = attention_backward(backward_call(torch.ones_like(out2), q.detach(), k.detach(), v.detach(), out2, lse2,
                                          [bias.detach()], [mask], *feats, [True]))
    assert all(torch.equal(a, torch.zeros_like(a)) for a in (*g2[:3], *g2[3]))


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "B%d_Hq%d_Hkv%d_M%d_N%d" % s)
def test_empty_problems(shape, monkeypatch):
    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    check_empty(shape, "cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "B%d_Hq%d_Hkv%d_M%d_N%d" % s)
def test_empty_problems_gpu(shape, monkeypatch):
    check_empty(shape, "cuda", monkeypatch)


def test_kernel_tanh_is_accurate_near_zero():
    """The templates' tanh (no libdevice: the interpreter has none) keeps fp32's relative
    precision near 0, where 1 - 2 / (e^2x + 1) cancels to an absolute error of ~1e-7; it is
    the softcap's, so a cap far above the scores must not cost precision there."""
    import triton
    import triton.language as tl

    from fusepass.kernels.forward import kernel_module
    from fusepass.kernels.spec import KernelSpec

    q = torch.empty(1, 1, 4, 16)
    spec = KernelSpec.for_call(forward_call(q, q, q, [], [], None, 1.0, 30.0, 0.0, -math.inf, "", []))
    globals()["_template_tanh"] = kernel_module(spec, interpret=True)._tanh  # a jit global, not a closure

    with render._interpret_env(True):  # triton.jit reads TRITON_INTERPRET when it runs
        @triton.jit
        def apply(X, Y, n: tl.constexpr):
            offs = tl.arange(0, n)
            tl.store(Y + offs, _template_tanh(tl.load(X + offs)))  # noqa: F821

    x = torch.cat([torch.logspace(-8, 1.3, 250), -torch.logspace(-8, 1.3, 250), torch.tensor([0.0] * 8)])
    x = torch.cat([x, torch.tensor([30.0, -30.0, 100.0, -100.0])])  # 512 values
    y = torch.empty_like(x)
    with render.interpreting():
        apply[(1,)](x, y, n=x.numel())
    want = torch.tanh(x.double())
    rel = ((y.double() - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert rel < 4e-7, rel


def _key_padding(B, N, valid, expanded_rows=0):
    """A right-padded batch's key mask [B, 1, 1, N] (row b sees keys < valid[b]); with
    ``expanded_rows`` the same vector expanded to [B, 1, M, N] (0 row stride), as some models hand it."""
    keep = (torch.arange(N)[None, :] < torch.tensor(valid)[:, None]).view(B, 1, 1, N)
    return keep.expand(B, 1, expanded_rows, N) if expanded_rows else keep


@pytest.mark.parametrize("form", ["bool", "bool_expanded", "additive", "additive_expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_padding_masks_are_read_as_key_vectors(form, dtype):
    """BERT's padding mask ([B, 1, 1, N] bool with a finite fill at inference, an additive
    0 / finfo.min bias in training) and the same mask expanded over rows: the variant reads one
    vector per key tile (mask_per_key / bias_per_key), and forward and backward match float64,
    the padded keys hidden, the bias's own gradient included."""
    from fusepass.kernels.backward import attention_backward
    from fusepass.kernels.forward import attention_forward
    from fusepass.kernels.spec import KernelSpec

    B, H, M, N, D = 3, 2, 37, 45, 16
    keep = _key_padding(B, N, [45, 30, 7], expanded_rows=M if form.endswith("expanded") else 0)
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for L in (M, N, N))
    fill = torch.finfo(dtype).min
    if form.startswith("bool"):
        biases, masks = [], [keep]
    else:
        vec = torch.zeros(B, 1, 1, N, dtype=dtype).masked_fill(~keep[:, :, :1], fill)
        biases, masks = [vec.expand(keep.shape) if form.endswith("expanded") else vec], []
    feats = (None, D ** -0.5, 0.0, 0.0, fill, "", [])
    call = forward_call(q, k, v, biases, masks, *feats)
    spec = KernelSpec.for_call(call)
    assert (spec.mask_per_key, spec.bias_per_key) == (((True,), ()) if masks else ((), (True,)))
    src = render.render("attention_fwd.py.jinja", spec.render_params())
    assert (" + jj * sm0_n," in src) if masks else (" + jj * sb0_n," in src)
    assert "ii * sm0_m" not in src and "ii * sb0_m" not in src
    out, lse = attention_forward(call)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, *biases)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *biases)]
    ref, ref_lse = dense_attention(*leaves64[:3], leaves64[3:], masks, *feats)
    eager, _ = dense_attention(*leaves[:3], leaves[3:], masks, *feats)
    assert_close = kernel_cases.assert_close_to_reference
    assert_close(out, eager, ref, name="out")
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    do = torch.randn_like(out)
    need = [True] * len(biases)
    grads = attention_backward(backward_call(do, q, k, v, out, lse, biases, masks, *feats, need))
    case = Case(B=B, Hq=H, Hkv=H, M=M, N=N, D=D, dtype=dtype)
    kernel_cases.assert_grads_match(case, grads, (q, k, v, biases, masks), feats, do)


def test_a_mask_with_rows_is_read_as_a_tile():
    """A mask that differs per query row keeps the tile load."""
    from fusepass.kernels.spec import KernelSpec

    q = k = v = torch.empty(1, 1, 8, 16)
    row_mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    spec = KernelSpec.for_call(forward_call(q, k, v, [torch.zeros(8, 8)], [row_mask], None, 1.0, 0.0, 0.0,
                                            -math.inf, "", []))
    assert (spec.mask_per_key, spec.bias_per_key) == ((False,), (False,))
    src = render.render("attention_fwd.py.jinja", spec.render_params())
    assert "ii * sm0_m" in src and "ii * sb0_m" in src
