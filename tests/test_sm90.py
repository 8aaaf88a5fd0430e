"""The sm_90 forward (kernels/sm90.py, templates/attention_fwd_sm90.py.jinja) against a float64
reference: under Triton's interpreter at small sizes (CPU), and compiled for a Hopper GPU at
real sizes (gpu marker).  Also its refusals, and its renders for every variant.

Every output buffer is poisoned with NaN before the kernel runs (launch_common.poison_outputs).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_close_to_reference  # noqa: E402
from fusepass.kernels import launch_common, launcher, render, sm90  # noqa: E402
from fusepass.kernels.spec import KernelSpec  # noqa: E402
from fusepass.ops.dispatch import forward_call  # noqa: E402

from kernel_cases import Case, dense_attention  # noqa: E402

CAUSAL = "j <= i + (N - M)"
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _poison_and_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusepass-cache"))
    monkeypatch.setattr(launch_common, "poison_outputs", True)
    yield


def _call(case: Case, q, k, v, biases, masks, seed):
    return forward_call(q, k, v, biases, masks, seed, case.D ** -0.5, case.softcap, case.dropout_p, case.fill,
                        case.expr, list(case.args))


def run_sm90_case(case: Case, device="cpu", config=None, factor=4.0):
    """The forward half of kernel_cases.run_case, through the sm_90 kernel."""
    q, k, v, biases, masks, seed = case.tensors(device)
    call = _call(case, q, k, v, biases, masks, seed)
    assert sm90.refusal(call, interpret=device == "cpu") is None
    before = sm90.launches_sm90["fwd"]
    out, lse = sm90.attention_forward(call, config)
    assert sm90.launches_sm90["fwd"] == before + 1

    feats = (seed, case.D ** -0.5, case.softcap, case.dropout_p, case.fill, case.expr, list(case.args))
    ref, ref_lse = dense_attention(q.double(), k.double(), v.double(), [b.double() for b in biases], masks, *feats)
    eager, _ = dense_attention(q, k, v, biases, masks, *feats)
    assert_close_to_reference(out, eager, ref, factor=factor, name="out")
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4, equal_nan=True)
    return out, lse


# Under the interpreter: D = 64 unless the case is about head dims; the default interpreter
# tiles are 32 x 32, so N = 47, 50, 77 ... end on a ragged key tile.
BF16, FP16 = torch.bfloat16, torch.float16
CPU_CASES = {
    "plain_ragged_n": Case(M=40, N=77, D=64, dtype=BF16),
    "causal_block_map": Case(M=64, N=64, D=64, expr=CAUSAL, dtype=BF16),
    "sliding_window_arg": Case(M=70, N=70, D=64, expr="(j <= i) & (i - j < a0)", args=(20,), dtype=FP16),
    "pred_reads_head": Case(Hq=2, Hkv=2, M=33, N=40, D=64, expr="(j <= i) | (h % 2 == 0)", dtype=FP16),
    "gqa_causal": Case(B=2, Hq=4, Hkv=2, M=33, N=50, D=64, expr=CAUSAL, dtype=BF16),
    "softcap": Case(M=33, N=47, D=64, softcap=2.0, dtype=FP16),
    "biases": Case(B=2, M=33, N=40, D=64, bias_shapes=((1, 2, 33, 40), (2, 1, 1, 40)), dtype=FP16),
    "bool_mask": Case(B=2, M=33, N=40, D=64, mask_shapes=((2, 1, 33, 40),), dtype=BF16),
    "m_gt_n_finite_fill": Case(M=70, N=33, D=64, expr=CAUSAL, fill=torch.finfo(FP16).min, dtype=FP16),
    "m_lt_n": Case(M=20, N=90, D=64, expr=CAUSAL, dtype=BF16),
    "mask_finite_fill": Case(B=2, M=20, N=24, D=64, mask_shapes=((2, 1, 20, 24),), fill=-1e9, dtype=BF16),
    "bias_finite_fill": Case(M=20, N=24, D=64, bias_shapes=((1, 2, 20, 24),), expr=CAUSAL, fill=-1e9, dtype=FP16),
    "dv_wider": Case(M=33, N=40, D=64, Dv=128, dtype=FP16),
    "dv_narrower_d128": Case(M=33, N=40, D=128, Dv=64, dtype=BF16),
    "d128": Case(M=40, N=50, D=128, dtype=BF16),
    "transposed_strides": Case(B=2, Hq=4, Hkv=2, M=33, N=40, D=64, transposed=True, dtype=BF16),
    "dropout": Case(M=40, N=50, D=64, dropout_p=0.25, dtype=FP16),
    "everything": Case(B=2, Hq=4, Hkv=2, M=45, N=37, D=64, Dv=128, expr=CAUSAL, fill=torch.finfo(BF16).min,
                       bias_shapes=((1, 4, 45, 37),), mask_shapes=((2, 1, 1, 37),), softcap=5.0, dropout_p=0.1,
                       dtype=BF16),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreted(name):
    run_sm90_case(CPU_CASES[name])


@pytest.mark.parametrize("cfg", [sm90.Sm90Config(32, 32, 4, 1, warp_specialize=1), sm90.Sm90Config(64, 16, 4, 1)],
                         ids=lambda c: c.short())
def test_interpreted_configs(cfg):
    # The warp-specialize knob only annotates the loop; the interpreter runs it as a plain one.
    run_sm90_case(Case(M=70, N=50, D=64, expr=CAUSAL, dtype=BF16), config=cfg)


def test_matches_fa2_bit_for_bit():
    """Same math in the same order as the FA2 forward: under the interpreter, the same bits."""
    from fusepass.kernels import forward

    case = Case(B=2, Hq=4, Hkv=2, M=45, N=70, D=64, expr=CAUSAL, softcap=5.0, dtype=BF16)
    call = _call(case, *case.tensors("cpu"))
    out, lse = sm90.attention_forward(call)
    out2, lse2 = forward.attention_forward(call)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_size_one_dims_take_any_stride():
    # One batch, one kv head, one query row: their strides never move a descriptor's base.
    case = Case(B=1, Hq=2, Hkv=1, M=1, N=40, D=64, dtype=FP16)
    q, k, v, biases, masks, seed = case.tensors("cpu")
    q = torch.as_strided(torch.randn(4096, dtype=FP16), (1, 2, 1, 64), (7, 64, 3, 1))
    k = torch.as_strided(k.clone(), (1, 1, 40, 64), (5, 3, 64, 1))
    call = _call(case, q, k, v, biases, masks, seed)
    assert sm90.refusal(call, interpret=True) is None
    assert sm90._tma_strides(q) == (0, 64, 64, 1)
    out, _ = sm90.attention_forward(call)
    ref, _ = dense_attention(q.double(), k.double(), v.double(), [], [], None, case.D ** -0.5, 0.0, 0.0, -math.inf, "",
                             [])
    eager, _ = dense_attention(q, k, v, [], [], None, case.D ** -0.5, 0.0, 0.0, -math.inf, "", [])
    assert_close_to_reference(out, eager, ref, name="out")


def test_empty_call():
    q = torch.randn(1, 2, 5, 64, dtype=BF16)
    k = v = torch.randn(1, 2, 0, 64, dtype=BF16)
    out, lse = sm90.attention_forward(forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, -math.inf, "", []))
    assert out.eq(0).all() and lse.eq(float("-inf")).all()


# Refusals: one per rule.

def _qkv(B=1, H=2, N=40, D=64, Dv=None, dtype=BF16):
    return (torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, H, N, D, dtype=dtype),
            torch.randn(B, H, N, Dv or D, dtype=dtype))


def _refusal(q, k, v, interpret=True, **kw):
    return sm90.refusal(forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, -math.inf, "", []), interpret=interpret,
                        **kw)


def _misaligned_pointer(t: torch.Tensor) -> torch.Tensor:
    flat = torch.randn(t.numel() + 1, dtype=t.dtype)[1:]  # 2 bytes past the storage's start
    return flat.view(t.shape)


REFUSALS = {
    "last_dim_not_contiguous": (lambda q, k, v: (torch.randn(1, 2, 64, 40, dtype=BF16).transpose(-1, -2), k, v),
                                "last dim is not contiguous"),
    "row_stride_misaligned": (lambda q, k, v: (q, torch.randn(1, 2, 40, 65, dtype=BF16)[..., :64], v),
                              "k's row stride 65 is not a multiple of 16 bytes"),
    "head_stride_misaligned": (lambda q, k, v: (q, k, torch.as_strided(torch.randn(6000, dtype=BF16), (1, 2, 40, 64),
                                                                        (0, 2567, 64, 1))),
                               "v's head stride"),
    "pointer_misaligned": (lambda q, k, v: (_misaligned_pointer(q), k, v), "data pointer is not 16-byte aligned"),
    "fp32": (lambda q, k, v: (q.float(), k.float(), v.float()), "dtype torch.float32"),
    "head_dim_80": (lambda q, k, v: _qkv(D=80), "head dim 80"),
    "value_head_dim_96": (lambda q, k, v: _qkv(Dv=96), "value head dim 96"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name):
    make, want = REFUSALS[name]
    reason = _refusal(*make(*_qkv()))
    assert reason is not None and want in reason, reason


def test_served_layouts():
    q, k, v = _qkv()
    assert _refusal(q, k, v) is None
    assert _refusal(*_qkv(D=128, Dv=64, dtype=FP16)) is None


def test_cpu_needs_the_interpreter():
    assert "CPU tensors" in _refusal(*_qkv(), interpret=False)


# Renders: every structural variant, both loop flavours, and the knobs of configs_for.

RENDER_SPECS = [
    KernelSpec(head_dim=64, v_head_dim=64),
    KernelSpec(expr=CAUSAL, head_dim=128, v_head_dim=128),
    KernelSpec(expr="(j <= i) & (i - j < a0)", n_args=1, head_dim=64, v_head_dim=128),
    KernelSpec(expr="(j <= i) | (h % 2 == 0)", head_dim=128, v_head_dim=64),
    KernelSpec(n_biases=2, n_masks=1, softcap=True, finite_fill=True, dropout=True, head_dim=64, v_head_dim=64),
    KernelSpec(n_masks=1, finite_fill=True, head_dim=128, v_head_dim=128),
    KernelSpec(n_biases=1, expr=CAUSAL, head_dim=64, v_head_dim=64, upcast_dot=True),
]


@pytest.mark.parametrize("loop_ws", [False, True])
@pytest.mark.parametrize("spec", RENDER_SPECS, ids=lambda s: f"b{s.n_biases}m{s.n_masks}{'p' if s.expr else ''}"
                         f"{'c' if s.softcap else ''}{'d' if s.dropout else ''}{'f' if s.finite_fill else ''}"
                         f"_{s.head_dim}x{s.v_head_dim}")
def test_renders_and_compiles(spec, loop_ws):
    src = render.render(sm90.TEMPLATE, dict(spec.render_params(), loop_ws=loop_ws))
    compile(src, "attention_fwd_sm90", "exec")
    assert src.count("tl.make_tensor_descriptor(") == 3
    assert ("warp_specialize=WARP_SPECIALIZE" in src) == loop_ws
    # The pipelined loops read K and V only through the descriptors.
    loops = src[src.index("q = q_desc.load"):src.index("out = acc / l_i")]
    if not spec.finite_fill:
        assert "tl.load(k_base" not in loops and "tl.load(v_base" not in loops


@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (64, 128), (128, 64)])
def test_configs_for_fit_and_launch_knobs(D, Dv):
    q, k, v = _qkv(D=D, Dv=Dv)
    call = forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, -math.inf, CAUSAL, [])
    cfgs = sm90.configs_for(call)
    assert cfgs and len(set(cfgs)) == len(cfgs)
    assert any(c.warp_specialize for c in cfgs) == sm90.loop_warp_specialize()
    params = set(sm90.kernel_module(KernelSpec.for_call(call), True).attn_fwd_sm90.arg_names)
    for cfg in cfgs:
        assert isinstance(cfg, sm90.Sm90Config) and cfg.BLOCK_M in (64, 128) and cfg.BLOCK_N in (64, 128)
        assert {"BLOCK_M", "BLOCK_N", "WARP_SPECIALIZE"} <= params
        assert sm90.Sm90Config.from_dict(cfg.as_dict()) == cfg


def test_plain_forward_config_is_accepted():
    from fusepass.autotune.config import ForwardConfig

    assert sm90._as_sm90(ForwardConfig(128, 64, 8, 3)) == sm90.Sm90Config(128, 64, 8, 3, warp_specialize=0)
    run_sm90_case(Case(M=40, N=50, D=64, dtype=FP16), config=ForwardConfig(32, 32, 4, 1))


# On a Hopper GPU, compiled, at real sizes.

def _hopper() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")

GPU_FEATURES = {  # Case fields besides D, Dv, dtype
    "plain": dict(B=2, Hq=8, Hkv=8, M=1000, N=1000),
    "causal_4k": dict(B=1, Hq=4, Hkv=4, M=4096, N=4096, expr=CAUSAL),
    "plain_4k_ragged": dict(B=1, Hq=4, Hkv=4, M=4000, N=4095),
    "gqa_causal": dict(B=2, Hq=8, Hkv=2, M=777, N=1024, expr=CAUSAL),
    "sliding_window": dict(B=1, Hq=4, Hkv=4, M=2048, N=2048, expr="(j <= i) & (i - j < a0)", args=(300,)),
    "softcap": dict(B=1, Hq=4, Hkv=4, M=1024, N=1500, softcap=30.0),
    "biases": dict(B=2, Hq=4, Hkv=4, M=600, N=500, bias_shapes=((1, 4, 600, 500), (2, 1, 1, 500))),
    "bool_mask": dict(B=2, Hq=4, Hkv=4, M=513, N=700, mask_shapes=((2, 1, 513, 700),)),
    "m_gt_n_finite_fill": dict(B=1, Hq=4, Hkv=4, M=1500, N=700, expr=CAUSAL, fill=-1e9),
    "dv_other": dict(B=1, Hq=4, Hkv=2, M=513, N=700, Dv="other"),
    "transposed": dict(B=2, Hq=8, Hkv=4, M=1000, N=1000, transposed=True, expr=CAUSAL),
    "dropout": dict(B=1, Hq=4, Hkv=4, M=1024, N=1024, dropout_p=0.1),
    "everything": dict(B=2, Hq=8, Hkv=4, M=600, N=500, expr="(j <= i + (N - M)) & (i - j < a0)", args=(300,),
                       fill=-1e9, bias_shapes=((1, 8, 600, 500),), mask_shapes=((2, 1, 1, 500),), softcap=30.0,
                       dropout_p=0.1, transposed=True),
}


def _gpu_case(name: str, D: int, dtype) -> Case:
    kw = dict(GPU_FEATURES[name])
    if kw.get("Dv") == "other":
        kw["Dv"] = 64 if D == 128 else 128
    return Case(D=D, dtype=dtype, **kw)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", list(GPU_FEATURES))
def test_gpu_cases(name, D, dtype):
    run_sm90_case(_gpu_case(name, D, dtype), device="cuda")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_every_config(D, causal):
    case = Case(B=2, Hq=4, Hkv=2, M=2048, N=2000, D=D, expr=CAUSAL if causal else "", dtype=BF16)
    q, k, v, *_ = case.tensors("cuda")
    for cfg in sm90.configs_for(forward_call(q, k, v, [], [], None, 0.125, 0.0, 0.0, -math.inf, case.expr, [])):
        run_sm90_case(case, device="cuda", config=cfg)


@pytest.mark.gpu
@needs_hopper
def test_gpu_direct_launch_and_allocator_per_thread():
    case = Case(B=1, Hq=4, Hkv=4, M=1024, N=1024, D=128, dtype=BF16)
    run_sm90_case(case, device="cuda")
    before = launcher.direct_launches["attn_fwd_sm90"]
    run_sm90_case(case, device="cuda")
    assert launcher.direct_launches["attn_fwd_sm90"] == before + 1
    # A thread starts with Triton's null allocator (a ContextVar): the launch sets one there too.
    errors = []
    t = threading.Thread(target=lambda: _capture(errors, run_sm90_case, case, "cuda"))
    t.start()
    t.join()
    assert not errors, errors


def _capture(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # reported by the test's own thread
        errors.append(e)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_refuses_other_architectures():
    q, k, v = (t.cuda() for t in _qkv())
    assert "not 9.x" in _refusal(q, k, v, capability=(8, 0))
    assert _refusal(q, k, v, capability=(9, 0)) is None


def test_the_choice_rule_at_compile_time():
    """What explain reads: served and preferred (D=128 on Hopper), else why the FA2 forward runs."""
    bf16 = torch.bfloat16
    assert sm90.static_refusal("cuda", bf16, 128, 128, (9, 0)) is None
    assert "FA2 forward is faster" in sm90.static_refusal("cuda", bf16, 64, 64, (9, 0))
    assert "Hopper" in sm90.static_refusal("cuda", bf16, 128, 128, (8, 0))
    assert "dtype" in sm90.static_refusal("cuda", torch.float32, 128, 128, (9, 0))
    assert sm90.static_refusal("cpu", bf16, 128, 128, None) is not None


@pytest.mark.gpu
@needs_hopper
def test_gpu_the_op_runs_sm90_at_d128_and_fa2_for_a_misaligned_view():
    """Through the op: a D=128 call runs the sm_90 kernel (its launch counter), from the second
    call on through its runner; a view of the same signature whose data pointer is 2 bytes off
    (TMA cannot read it) takes the full path to the FA2 forward; D=64 runs the FA2 forward.
    Every output is checked against float64."""
    from fusepass.ops import dispatch
    from fusepass.ops.attention import fused_attention

    dev, dt = "cuda", torch.bfloat16
    base = torch.randn(2, 4, 300, 136, device=dev, dtype=dt)
    k, v = (torch.randn(2, 4, 300, 128, device=dev, dtype=dt) for _ in range(2))
    feats = ([], [], None, 128 ** -0.5, 0.0, 0.0, -math.inf, CAUSAL, [])
    for offset, want in ((0, 1), (0, 1), (0, 1), (1, 0)):
        q = base[..., offset:offset + 128]
        before = sm90.launches_sm90["fwd"]
        out = fused_attention(q, k, v, mask_expr=CAUSAL)
        assert sm90.launches_sm90["fwd"] - before == want, f"offset {offset}"
        ref, _ = dense_attention(q.double(), k.double(), v.double(), *feats)
        eager, _ = dense_attention(q, k, v, *feats)
        assert_close_to_reference(out, eager, ref, name=f"offset {offset}")
    assert any(getattr(r, "family", "") == sm90.FAMILY for r in dispatch._runners.values())
    q64, k64, v64 = (torch.randn(2, 4, 300, 64, device=dev, dtype=dt) for _ in range(3))
    before, before_sm90 = dict(launch_common.launches), sm90.launches_sm90["fwd"]
    fused_attention(q64, k64, v64)
    assert sm90.launches_sm90["fwd"] == before_sm90
    assert launch_common.launches["fwd"] == before["fwd"] + 1


def test_the_dispatch_runs_both_sm90_directions_where_the_rule_says(monkeypatch):
    """The op's path to the sm_90 kernels, on CPU: the interpreter stands in for the GPU
    (dispatch._binds, and the family's refusals with interpret=True).  Through the op with
    autograd, a D=128 call runs the sm_90 forward and backward, and its output and gradients
    match float64; a view of the same signature 2 bytes off, and a D=64 call, run the FA2
    kernels.  (On a GPU: test_gpu_the_op_runs_sm90_at_d128_and_fa2_for_a_misaligned_view.)"""
    import functools

    from fusepass.ops import dispatch
    from fusepass.ops.attention import fused_attention

    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_binds", lambda q: True)
    monkeypatch.setattr(sm90, "refusal", functools.partial(sm90.refusal, interpret=True))
    monkeypatch.setattr(sm90, "backward_refusal", functools.partial(sm90.backward_refusal, interpret=True))
    torch.manual_seed(0)
    base = torch.randn(1, 2, 40, 136, dtype=torch.bfloat16)
    k, v, dout = (torch.randn(1, 2, 40, 128, dtype=torch.bfloat16) for _ in range(3))
    for offset, sm90_runs in ((0, 1), (1, 0)):
        q = base[..., offset:offset + 128]
        q_base, kl, vl = (t.detach().clone().requires_grad_(True) for t in (base, k, v))
        q_view = q_base[..., offset:offset + 128]  # offset 1: 2 bytes off, same shape and strides
        before = dict(sm90.launches_sm90)
        out = fused_attention(q_view, kl, vl, mask_expr=CAUSAL)
        out.backward(dout)
        got_grads = (q_base.grad[..., offset:offset + 128], kl.grad, vl.grad)
        assert sm90.launches_sm90["fwd"] - before.get("fwd", 0) == sm90_runs, f"offset {offset}"
        assert sm90.launches_sm90["bwd"] - before.get("bwd", 0) == sm90_runs, f"offset {offset}"
        feats = ([], [], None, 128 ** -0.5, 0.0, 0.0, -math.inf, CAUSAL, [])
        for dtype, name in ((torch.float64, "ref"), (torch.bfloat16, "eager")):
            xs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
            o, _ = dense_attention(*xs, *feats)
            o.backward(dout.to(dtype))
            if name == "ref":
                ref_out, ref_grads = o, [x.grad for x in xs]
            else:
                eager_out, eager_grads = o, [x.grad for x in xs]
        assert_close_to_reference(out, eager_out, ref_out, name=f"out, offset {offset}")
        for label, got, e, r in zip("qkv", got_grads, eager_grads, ref_grads):
            assert_close_to_reference(got, e, r, name=f"d{label}, offset {offset}")
    q64, k64, v64 = (torch.randn(1, 2, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    before = dict(sm90.launches_sm90)
    fused_attention(q64, k64, v64)
    assert sm90.launches_sm90 == before  # D=64: the FA2 forward is faster there
