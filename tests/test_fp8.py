"""The FP8 forward (kernels/fp8.py) and its per-site guard (ops/fp8_guard.py), on CPU: the
rotation and quantization helpers, the e4m3 kernel under Triton's interpreter against float64,
the guard's decision, and that training never runs e4m3."""

from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("triton")

from fusepass.kernels import fp8, forward, launch_common  # noqa: E402
from fusepass.ops import fp8_guard  # noqa: E402
from fusepass.ops.dispatch import forward_call  # noqa: E402
from kernel_cases import dense_attention  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_guard(monkeypatch):
    monkeypatch.setattr(fp8_guard, "_decisions", {})
    monkeypatch.setattr(fp8_guard, "_refused", set())
    monkeypatch.setattr(launch_common, "poison_outputs", True)  # an unwritten output element is NaN


def _rel_rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dim", [16, 64, 128, 256])
def test_the_rotation_is_orthogonal_and_keeps_every_dot_product(dim):
    R = fp8.rotation(dim, torch.device("cpu")).double()
    torch.testing.assert_close(R @ R.T, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(R.abs(), torch.full_like(R, dim ** -0.5))  # a signed, scaled Hadamard matrix
    q, k = torch.randn(5, dim, dtype=torch.float64), torch.randn(7, dim, dtype=torch.float64)
    torch.testing.assert_close((q @ R) @ (k @ R).T, q @ k.T)
    with pytest.raises(ValueError, match="power-of-two"):
        fp8.rotation(80, torch.device("cpu"))


def test_the_rotation_spreads_an_outlier_channel():
    x = torch.randn(64, 128)
    x[:, 7] *= 100.0
    rotated = x @ fp8.rotation(128, torch.device("cpu"))
    ratio = lambda t: (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean().item()  # noqa: E731
    assert ratio(x) > 10.0 and ratio(rotated) < 4.5  # a row's max against its RMS: what sets its scale


def test_quantization_is_within_e4m3_s_rounding():
    """The device kernels' q, k and v, dequantized (and q, k rotated back), against the inputs:
    every element within e4m3's relative rounding (3 mantissa bits) where it is in e4m3's normal
    range; a row's (channel's) largest element at E4M3_MAX; an all-zero row with scale 1."""
    torch.manual_seed(0)
    q = (torch.randn(2, 5, 33, 64) * torch.logspace(-3, 3, 5)[None, :, None, None]).to(torch.bfloat16)
    q[1, 2, 4] = 0.0
    k, v = torch.randn(2, 5, 70, 64, dtype=torch.bfloat16), torch.randn(2, 5, 70, 48, dtype=torch.bfloat16)
    v[0, 1, :, 3] *= 1000.0
    x = fp8.quantize(q, k, v)
    assert (x.q.dtype, x.k.dtype, x.v.dtype) == (torch.float8_e4m3fn,) * 3
    assert x.q_scale[1, 2, 4] == 1.0 and (x.q[1, 2, 4].float() == 0).all()
    R = fp8.rotation(64, torch.device("cpu")).double()
    for name, x8, scale, want, axis in (("q", x.q, x.q_scale, q.double() @ R, -1), ("k", x.k, x.k_scale,
                                        k.double() @ R, -1), ("v", x.v, x.v_scale, v.double(), -2)):
        s = scale.double().unsqueeze(axis)
        back = x8.double() * s
        live = scale != 1.0
        peak = x8.float().abs().amax(axis)
        assert torch.equal(peak[live], torch.full_like(peak[live], fp8.E4M3_MAX)), name
        normal = want.abs() >= s * 2.0 ** -6
        assert ((back - want).abs() <= want.abs() * 2.0 ** -4 + 1e-9)[normal].all(), name


def test_padded_head_dims_keep_the_scores():
    q, k, v = torch.randn(1, 2, 9, 80), torch.randn(1, 2, 11, 80), torch.randn(1, 2, 11, 40)
    x = fp8.quantize(q, k, v)
    assert x.q.shape == (1, 2, 9, 128) and x.v.shape == (1, 2, 11, 40) and x.v_scale.shape == (1, 2, 40)
    assert x.v.stride()[-2:] == (1, 11)  # keys contiguous: the layout an e4m3 P @ V operand needs
    s = (x.q.double() * x.q_scale[..., None]) @ (x.k.double() * x.k_scale[..., None]).transpose(-1, -2)
    assert _rel_rms(s, q.double() @ k.double().transpose(-1, -2)) < 0.1


CASES = [  # (B, Hq, Hkv, M, N, D, Dv, expr, args, fill, bias)
    (1, 2, 2, 40, 40, 64, 64, "", (), -math.inf, False),
    (2, 4, 2, 33, 70, 80, 40, "j <= i + (N - M)", (), -math.inf, False),  # GQA, D padded to 128, causal
    (1, 2, 1, 24, 50, 32, 32, "(j <= i) & (j > i - a0)", (8,), -1e9, True),  # window, finite fill, a bias
    (1, 2, 2, 16, 40, 64, 64, "j < a0", (0,), -math.inf, False),  # no visible key: NaN rows, as eager
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}_G{c[1] // c[2]}_D{c[5]}_{c[7][:8]}")
def test_the_e4m3_kernel_against_float64(case):
    B, Hq, Hkv, M, N, D, Dv, expr, args, fill, with_bias = case
    torch.manual_seed(1)
    q = torch.randn(B, Hq, M, D, dtype=torch.bfloat16)
    k, v = torch.randn(B, Hkv, N, D, dtype=torch.bfloat16), torch.randn(B, Hkv, N, Dv, dtype=torch.bfloat16)
    biases = [torch.randn(1, Hq, M, N, dtype=torch.bfloat16)] if with_bias else []
    feats = (None, D ** -0.5, 0.0, 0.0, fill, expr, list(args))
    call = forward_call(q, k, v, biases, [], *feats, "interpret=1")
    out, lse = fp8.attention_forward(call)
    assert out.dtype == torch.bfloat16 and out.shape == (B, Hq, M, Dv)
    ref, ref_lse = dense_attention(q.double(), k.double(), v.double(), [b.double() for b in biases], [], *feats)
    assert torch.equal(out.isnan(), ref.isnan())
    live = ~ref.isnan()
    if live.any():
        assert _rel_rms(out[live], ref[live]) < 0.1
        assert (lse.double() - ref_lse)[~ref_lse.isinf()].abs().max() < 0.1


def _compiled(**options):
    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), dim=-1) @ v

    return torch.compile(attention, backend="fusepass", dynamic=False,
                         options={"fp8": True, "interpret": True, "inner": "aot_eager", "autotune": False, **options})


def test_a_site_runs_e4m3_from_its_second_call_once_the_guard_passes(caplog):
    f = _compiled()
    q, k, v = (torch.randn(1, 2, 48, 64, dtype=torch.bfloat16) for _ in range(3))
    want, _ = forward.attention_forward(forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, -math.inf, "", [],
                                                     "interpret=1"))
    before = launch_common.launches["fp8"]
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="fusepass.ops.fp8_guard"):
        first = f(q, k, v)
        assert launch_common.launches["fp8"] == before + 1  # the guard's trial
        assert torch.equal(first, want)  # the first call returns the bf16 kernel's output
        second = f(q, k, v)
    assert launch_common.launches["fp8"] == before + 2
    (decision,) = fp8_guard.decisions().values()
    assert decision.use_fp8 and 0 < decision.error < fp8_guard.MAX_REL_RMS_ERROR
    assert "runs e4m3" in caplog.text
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8, -1) @ v.double()
    assert 0 < _rel_rms(second, ref) < 0.1 and not torch.equal(second, first)


def test_a_site_whose_e4m3_error_is_too_large_keeps_its_dtype(caplog):
    f = _compiled()
    # Scores of std ~16: e4m3's 6% score error is a factor e in a probability.
    q, k, v = (torch.randn(1, 2, 48, 64, dtype=torch.bfloat16) * s for s in (4, 4, 1))
    before = launch_common.launches["fp8"]
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="fusepass.ops.fp8_guard"):
        f(q, k, v)
        out = f(q, k, v)
    assert launch_common.launches["fp8"] == before + 1  # the trial only
    (decision,) = fp8_guard.decisions().values()
    assert not decision.use_fp8 and decision.error > fp8_guard.MAX_REL_RMS_ERROR
    assert "stays torch.bfloat16" in caplog.text
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8, -1) @ v.double()
    assert _rel_rms(out, ref) < 0.02


def test_training_and_unserved_calls_never_run_e4m3():
    f = _compiled()
    q, k, v = (torch.randn(1, 2, 16, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    before = launch_common.launches["fp8"]
    for _ in range(2):
        f(q, k, v).sum().backward()  # the trainable op drops fp8 from its run options
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    with torch.no_grad():
        f(q32, k32, v32)
    assert launch_common.launches["fp8"] == before
    assert "float16 and bfloat16" in fp8.refusal(forward_call(q32, k32, v32, [], [], None, 0.1, 0.0, 0.0,
                                                                 -math.inf, "", []))
    drop = forward_call(q.detach(), k.detach(), v.detach(), [], [], torch.tensor(3), 0.1, 0.0, 0.1, -math.inf, "", [])
    assert fp8.refusal(drop) == "dropout (training)"


def test_the_option_travels_in_the_run_string():
    from fusepass.ops.attention import _trainable_run
    from fusepass.options import Options, RunOptions

    run = Options(fp8=True).run().encode()
    assert RunOptions.decode(run).fp8 is True
    assert RunOptions.decode(_trainable_run(run)).fp8 is None
    assert Options().run().fp8 is None


def _outliers(shape, dtype, device, gen):
    """FlashAttention-3's outlier inputs: N(0, 1) plus N(0, 100) at 0.1% of the positions."""
    x = torch.randn(shape, generator=gen, device=device)
    spikes = torch.rand(shape, generator=gen, device=device) < 1e-3
    return (x + spikes * torch.randn(shape, generator=gen, device=device) * 10.0).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("D,expr,G", [(64, "", 1), (128, "j <= i + (N - M)", 4), (80, "", 2)])
def test_gpu_e4m3_kernel_with_outliers(D, expr, G):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hkv, M, N = 2, 4, 1000, 1500
    q = _outliers((B, Hkv * G, M, D), torch.bfloat16, "cuda", gen)
    k, v = (_outliers((B, Hkv, N, D), torch.bfloat16, "cuda", gen) for _ in range(2))
    feats = (None, D ** -0.5, 0.0, 0.0, -math.inf, expr, [])
    call = forward_call(q, k, v, [], [], *feats, "autotune=0")
    out, _ = fp8.attention_forward(call)
    own, _ = forward.attention_forward(call)
    ref, _ = dense_attention(q.double(), k.double(), v.double(), [], [], *feats)
    err, own_err = _rel_rms(out, ref), _rel_rms(own, ref)
    print(f"D={D} G={G} {expr!r}: e4m3 {err:.4f}, bf16 {own_err:.5f} (relative RMS against float64)")
    assert err < fp8_guard.MAX_REL_RMS_ERROR and own_err < 0.01


def test_explain_says_what_fp8_does_at_each_site():
    import fusepass

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v

    opts = {"fp8": True, "interpret": True, "inner": "aot_eager", "autotune": False}
    q, k, v = (torch.randn(1, 2, 32, 64, dtype=torch.bfloat16) for _ in range(3))
    report = fusepass.explain(attention, q, k, v, options=opts)
    assert report.sites[0].runs_on.endswith("fp8 e4m3 once its first call passes the accuracy guard")
    assert report.sites[0].runs_on_short == "triton prefill (fp8 guarded)"
    assert len(report.fp8) == 1 and report.fp8[0].use_fp8 and "fp8 guard: q[1, 2, 32, 64]" in str(report)
    torch._dynamo.reset()
    report = fusepass.explain(attention, q.requires_grad_(), k, v, options=opts)
    assert report.sites[0].runs_on.endswith("not fp8 (a trainable site keeps its dtype)") and not report.fp8
