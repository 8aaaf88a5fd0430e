"""The sm_90 backward (kernels/sm90.py: templates/attention_bwd.py.jinja rendered with tma=True)
against float64 autograd: under Triton's interpreter at small sizes (CPU), and compiled for a
Hopper GPU at real sizes (gpu marker).  Also its bit-for-bit agreement with the FA2 backward
(same math, same order: only the loads differ), its refusals and its renders.

The forward of every case is the sm_90 forward's; every output buffer is poisoned with NaN
before the kernels run (launch_common.poison_outputs).  Tolerances are kernel_cases.run_case's:
at most 4x eager's own error against float64 (conftest.assert_close_to_reference).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from conftest import assert_close_to_reference  # noqa: E402
from fusepass.autotune.config import BackwardConfig  # noqa: E402
from fusepass.kernels import backward, launch_common, launcher, render, sm90  # noqa: E402
from fusepass.kernels.spec import KernelSpec  # noqa: E402
from fusepass.ops.dispatch import backward_call, forward_call  # noqa: E402

from kernel_cases import Case, assert_grads_match, dense_attention  # noqa: E402

CAUSAL = "j <= i + (N - M)"
HAS_CUDA = torch.cuda.is_available()
BF16, FP16 = torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _poison_and_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fusepass-cache"))
    monkeypatch.setattr(launch_common, "poison_outputs", True)
    yield


def _feats(case: Case, seed):
    return (seed, case.D ** -0.5, case.softcap, case.dropout_p, case.fill, case.expr, list(case.args))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) and \
        torch.equal(a.isnan(), b.isnan())


def run_bwd_case(case: Case, device="cpu", config=None, factor=4.0, against_fa2=False):
    """kernel_cases.run_case through the sm_90 forward and backward: dq, dk, dv and the bias
    gradients against float64 autograd; with ``against_fa2``, also the FA2 backward's
    gradients for the same call and config, bit for bit."""
    q, k, v, biases, masks, seed = case.tensors(device)
    feats = _feats(case, seed)
    out, lse = sm90.attention_forward(forward_call(q, k, v, biases, masks, *feats))
    need = [case.bias_grad] * len(biases)
    do = torch.randn_like(out)
    bcall = backward_call(do, q, k, v, out, lse, biases, masks, *feats, need)
    assert sm90.backward_refusal(bcall, interpret=device == "cpu") is None
    before = sm90.launches_sm90["bwd"], launch_common.launches["dkdv"], launch_common.launches["dq"]
    dq, dk, dv, dbs = sm90.attention_backward(bcall, config)
    after = sm90.launches_sm90["bwd"], launch_common.launches["dkdv"], launch_common.launches["dq"]
    assert after == tuple(b + 1 for b in before)
    assert_grads_match(case, (dq, dk, dv, dbs), (q, k, v, biases, masks), feats, do, factor)
    names = ["dq", "dk", "dv"] + [f"dbias{i}" for i in range(len(biases))]
    got = [dq, dk, dv] + list(dbs)
    if against_fa2:
        fa2 = backward.attention_backward(bcall, config)
        for name, a, b in zip(names, got, [*fa2[:3], *fa2[3]]):
            assert _same(a, b), f"{name}: the sm_90 backward differs from the FA2 backward"
    return got


# Under the interpreter the tiles are 32 x 32 (sm90.backward_default_config), so M and N of 45,
# 70, 77 ... end on ragged tiles.  D = 64 unless the case is about head dims.
CPU_CASES = {
    "plain_ragged": Case(M=45, N=77, D=64, dtype=BF16),
    "causal": Case(M=64, N=64, D=64, expr=CAUSAL, dtype=FP16),
    "causal_ragged_m_gt_n": Case(M=70, N=45, D=64, expr=CAUSAL, dtype=BF16),
    "gqa_causal": Case(B=2, Hq=4, Hkv=2, M=33, N=50, D=64, expr=CAUSAL, dtype=BF16),
    "pred_reads_head": Case(Hq=2, Hkv=2, M=33, N=40, D=64, expr="(j <= i) | (h % 2 == 0)", dtype=FP16),
    "sliding_window_arg": Case(M=70, N=70, D=64, expr="(j <= i) & (i - j < a0)", args=(20,), dtype=FP16),
    "softcap": Case(M=33, N=47, D=64, softcap=2.0, dtype=FP16),
    "bias_store_and_atomic": Case(B=2, M=33, N=40, D=64, bias_shapes=((2, 2, 33, 40), (2, 1, 1, 40)), dtype=FP16),
    "bias_no_grad": Case(M=33, N=40, D=64, bias_shapes=((1, 2, 33, 40),), bias_grad=False, dtype=BF16),
    "bool_mask": Case(B=2, M=33, N=40, D=64, mask_shapes=((2, 1, 33, 40),), dtype=BF16),
    "dv_wider": Case(M=33, N=40, D=64, Dv=128, dtype=FP16),
    "dv_narrower_d128": Case(M=33, N=40, D=128, Dv=64, dtype=BF16),
    "dropout": Case(M=40, N=50, D=64, dropout_p=0.25, dtype=FP16),
    "finite_fill_pred": Case(M=70, N=33, D=64, expr=CAUSAL, fill=torch.finfo(FP16).min, dtype=FP16),
    "finite_fill_mask": Case(B=2, M=20, N=24, D=64, mask_shapes=((2, 1, 20, 24),), fill=-1e9, dtype=BF16),
    "finite_fill_bias": Case(M=20, N=24, D=64, bias_shapes=((1, 2, 20, 24),), expr=CAUSAL, fill=-1e9, dtype=FP16),
    "transposed_strides": Case(B=2, Hq=4, Hkv=2, M=33, N=40, D=64, transposed=True, dtype=BF16),
    "everything": Case(B=2, Hq=4, Hkv=2, M=45, N=37, D=64, Dv=128, expr=CAUSAL, fill=torch.finfo(BF16).min,
                       bias_shapes=((1, 4, 45, 37),), mask_shapes=((2, 1, 1, 37),), softcap=5.0, dropout_p=0.1,
                       dtype=BF16),
}
@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreted(name):
    # Same math in the same order as the FA2 backward (the loads differ, not what they read):
    # its gradients for the same call and config, bit for bit, too.
    run_bwd_case(CPU_CASES[name], against_fa2=True)


def test_interpreted_config_with_other_tiles():
    # BLOCK_OWN != BLOCK_STEP: the dK/dV pass's boxes are [16, D] for Q / dO and [64, D] for
    # K / V; the dQ pass's the other way round.
    run_bwd_case(Case(B=1, Hq=2, Hkv=1, M=70, N=50, D=64, expr=CAUSAL, dtype=BF16),
                 config=BackwardConfig(64, 16, 4, 1), against_fa2=True)


def test_size_one_dims_take_any_stride():
    # One batch, one kv head, one query row: their strides never move a descriptor's base.
    case = Case(B=1, Hq=2, Hkv=1, M=1, N=40, D=64, dtype=FP16)
    q, k, v, biases, masks, seed = case.tensors("cpu")
    q = torch.as_strided(torch.randn(4096, dtype=FP16), (1, 2, 1, 64), (7, 64, 3, 1))
    k = torch.as_strided(k.clone(), (1, 1, 40, 64), (5, 3, 64, 1))
    feats = _feats(case, seed)
    out, lse = sm90.attention_forward(forward_call(q, k, v, [], [], *feats))
    do = torch.as_strided(torch.randn(4096, dtype=FP16), (1, 2, 1, 64), (9, 64, 5, 1))
    bcall = backward_call(do, q, k, v, out, lse, [], [], *feats, [])
    assert sm90.backward_refusal(bcall, interpret=True) is None
    dq, dk, dv, _ = sm90.attention_backward(bcall)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref, _ = dense_attention(*leaves64, [], [], *feats)
    eager, _ = dense_attention(*leaves, [], [], *feats)
    for name, a, e, r in zip(("dq", "dk", "dv"), (dq, dk, dv), torch.autograd.grad(eager, leaves, do),
                             torch.autograd.grad(ref, leaves64, do.double())):
        assert_close_to_reference(a, e, r, name=name)


def test_empty_call():
    q = torch.randn(1, 2, 5, 64, dtype=BF16)
    k = v = torch.randn(1, 2, 0, 64, dtype=BF16)
    out = torch.zeros(1, 2, 5, 64, dtype=BF16)
    lse = torch.full((1, 2, 5), float("-inf"))
    bias = torch.randn(1, 2, 5, 0, dtype=BF16)
    bcall = backward_call(out, q, k, v, out, lse, [bias], [], None, 0.125, 0.0, 0.0, -math.inf, "", [], [True])
    dq, dk, dv, dbs = sm90.attention_backward(bcall)
    assert dq.eq(0).all() and dk.shape == k.shape and dv.shape == v.shape and dbs[0].shape == bias.shape


# Refusals: the forward's rules for q, k, v; the same for grad_out and out; overlapping rows.

def _bcall(q=None, k=None, v=None, do=None, out=None, D=64, Dv=None, dtype=BF16, N=40, precision=None):
    Dv = Dv or D
    q = torch.randn(1, 2, 40, D, dtype=dtype) if q is None else q
    k = torch.randn(1, 2, N, D, dtype=dtype) if k is None else k
    v = torch.randn(1, 2, N, Dv, dtype=dtype) if v is None else v
    out = torch.randn(1, 2, 40, v.shape[-1], dtype=v.dtype) if out is None else out
    do = torch.randn_like(out) if do is None else do
    return backward_call(do, q, k, v, out, torch.zeros(1, 2, 40), [], [], None, 0.125, 0.0, 0.0, -math.inf, "", [],
                         [])


def _misaligned(shape, dtype=BF16):
    n = math.prod(shape)
    return torch.randn(n + 1, dtype=dtype)[1:].view(shape)  # 2 bytes past the storage's start


REFUSALS = {
    "grad_out_pointer": (lambda: _bcall(do=_misaligned((1, 2, 40, 64))), "grad_out's data pointer"),
    "out_pointer": (lambda: _bcall(out=_misaligned((1, 2, 40, 64))), "out's data pointer"),
    "grad_out_last_dim": (lambda: _bcall(do=torch.randn(1, 2, 64, 40, dtype=BF16).transpose(-1, -2)),
                          "grad_out's last dim is not contiguous"),
    "out_row_stride": (lambda: _bcall(out=torch.randn(1, 2, 40, 65, dtype=BF16)[..., :64]),
                       "out's row stride 65 is not a multiple of 16 bytes"),
    "grad_out_head_stride": (lambda: _bcall(do=torch.as_strided(torch.randn(6000, dtype=BF16), (1, 2, 40, 64),
                                                                (0, 2567, 64, 1))), "grad_out's head stride"),
    "grad_out_expanded_rows": (lambda: _bcall(do=torch.randn(1, 2, 1, 64, dtype=BF16).expand(1, 2, 40, 64)),
                               "grad_out's rows overlap"),
    "q_pointer": (lambda: _bcall(q=_misaligned((1, 2, 40, 64))), "q's data pointer"),
    "k_last_dim": (lambda: _bcall(k=torch.randn(1, 2, 64, 40, dtype=BF16).transpose(-1, -2)),
                   "k's last dim is not contiguous"),
    "fp16_fp32_exact": (lambda: _bcall(dtype=torch.float32), "dtype torch.float32"),
    "head_dim_80": (lambda: _bcall(D=80), "head dim 80"),
    "value_head_dim_32": (lambda: _bcall(Dv=32), "value head dim 32"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name):
    make, want = REFUSALS[name]
    reason = sm90.backward_refusal(make(), interpret=True)
    assert reason is not None and want in reason, reason


def test_served_layouts_and_the_cpu_rule():
    assert sm90.backward_refusal(_bcall(), interpret=True) is None
    assert sm90.backward_refusal(_bcall(D=128, Dv=64, dtype=FP16), interpret=True) is None
    assert "CPU tensors" in sm90.backward_refusal(_bcall(), interpret=False)


def test_fp32_exact_mode_runs_on_the_fa2_backward():
    """What the sm_90 backward refuses (here fp32 with IEEE dots: the exact mode) the FA2
    backward still serves."""
    from fusepass.kernels import forward

    case = Case(M=20, N=24, D=64, expr=CAUSAL, dtype=torch.float32)
    q, k, v, _, _, seed = case.tensors("cpu")
    feats = _feats(case, seed)
    out, lse = forward.attention_forward(forward_call(q, k, v, [], [], *feats))
    bcall = backward_call(torch.randn_like(out), q, k, v, out, lse, [], [], *feats, [])
    assert "float32" in sm90.backward_refusal(bcall, interpret=True)
    dq, dk, dv, _ = backward.attention_backward(bcall)
    assert dq.shape == q.shape and not dq.isnan().any()


# Renders: the tma flag off is the FA2 backward (its renders are compared with the old
# template's in the session that added the flag); on, every big operand comes by descriptor.

RENDER_SPECS = [
    KernelSpec(head_dim=64, v_head_dim=64),
    KernelSpec(expr=CAUSAL, head_dim=128, v_head_dim=128),
    KernelSpec(expr="(j <= i) | (h % 2 == 0)", head_dim=128, v_head_dim=64),
    KernelSpec(n_biases=2, n_masks=1, softcap=True, finite_fill=True, dropout=True, head_dim=64, v_head_dim=64,
               bias_grad=("store", "atomic_m")),
    KernelSpec(n_masks=1, finite_fill=True, head_dim=64, v_head_dim=128),
    KernelSpec(finite_fill=True, expr=CAUSAL, head_dim=64, v_head_dim=64),
]


@pytest.mark.parametrize("spec", RENDER_SPECS, ids=lambda s: f"b{s.n_biases}m{s.n_masks}{'p' if s.expr else ''}"
                         f"{'c' if s.softcap else ''}{'d' if s.dropout else ''}{'f' if s.finite_fill else ''}"
                         f"_{s.head_dim}x{s.v_head_dim}")
def test_renders(spec):
    plain = render.render(sm90.BWD_TEMPLATE, spec.render_params())
    src = render.render(sm90.BWD_TEMPLATE, dict(spec.render_params(), tma=True))
    compile(src, "attention_bwd_tma", "exec")
    assert "make_tensor_descriptor" not in plain and "tma=True" not in plain
    # pre: O, dO; dK/dV: K, V, and Q, dO per query head; dQ: Q, dO, K, V.
    assert src.count("tl.make_tensor_descriptor(") == 10
    for name in ("attn_bwd_pre", "attn_bwd_dkdv", "attn_bwd_dq"):
        body = src[src.index(f"def {name}("):]
        body = body[:body.find("\n@triton.jit", 1) if "\n@triton.jit" in body else len(body)]
        for base in ("q_base", "k_base", "v_base", "do_base", "DO +", "O +"):
            assert f"tl.load({base}" not in body, (name, base)


@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (64, 128), (128, 64)])
@pytest.mark.parametrize("N", [1024, 8192])
def test_configs_for_and_defaults(D, Dv, N):
    bcall = _bcall(D=D, Dv=Dv)
    cfgs = sm90.backward_configs_for(bcall)
    assert cfgs and len(set(cfgs)) == len(cfgs) and all(isinstance(c, BackwardConfig) for c in cfgs)
    default = sm90.backward_default_config(_bcall(D=D, Dv=Dv, N=N))
    assert default in sm90.backward_configs_for(bcall)
    assert sm90.backward_default_config(bcall, interpret=True) == BackwardConfig(32, 32, 4, 1)


def test_a_forward_config_is_refused():
    from fusepass.autotune.config import ForwardConfig

    case = Case(M=20, N=24, D=64, dtype=BF16)
    q, k, v, _, _, seed = case.tensors("cpu")
    feats = _feats(case, seed)
    out, lse = sm90.attention_forward(forward_call(q, k, v, [], [], *feats))
    with pytest.raises(TypeError, match="BackwardConfig"):
        sm90.attention_backward(backward_call(torch.randn_like(out), q, k, v, out, lse, [], [], *feats, []),
                                ForwardConfig(32, 32, 4, 1))


# On a Hopper GPU, compiled, at real sizes.

def _hopper() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU")

GPU_FEATURES = {  # Case fields besides D, Dv, dtype
    "plain": dict(B=2, Hq=8, Hkv=8, M=1000, N=1000),
    "causal_4k": dict(B=1, Hq=4, Hkv=4, M=4096, N=4096, expr=CAUSAL),
    "plain_4k_ragged": dict(B=1, Hq=2, Hkv=2, M=4000, N=4095),
    "gqa_causal": dict(B=2, Hq=8, Hkv=2, M=777, N=1024, expr=CAUSAL),
    "sliding_window": dict(B=1, Hq=4, Hkv=4, M=2048, N=2048, expr="(j <= i) & (i - j < a0)", args=(300,)),
    "softcap": dict(B=1, Hq=4, Hkv=4, M=1024, N=1500, softcap=30.0),
    "biases": dict(B=2, Hq=4, Hkv=4, M=600, N=500, bias_shapes=((2, 4, 600, 500), (2, 1, 1, 500))),
    "bool_mask": dict(B=2, Hq=4, Hkv=4, M=513, N=700, mask_shapes=((2, 1, 513, 700),)),
    "m_gt_n_finite_fill": dict(B=1, Hq=4, Hkv=4, M=1500, N=700, expr=CAUSAL, fill="min"),
    "dv_other": dict(B=1, Hq=4, Hkv=2, M=513, N=700, Dv="other"),
    "transposed": dict(B=2, Hq=8, Hkv=4, M=1000, N=1000, transposed=True, expr=CAUSAL),
    "dropout": dict(B=1, Hq=4, Hkv=4, M=1024, N=1024, dropout_p=0.1),
    "everything": dict(B=2, Hq=8, Hkv=4, M=600, N=500, expr="(j <= i + (N - M)) & (i - j < a0)", args=(300,),
                       fill="min", bias_shapes=((1, 8, 600, 500),), mask_shapes=((2, 1, 1, 500),), softcap=30.0,
                       dropout_p=0.1, transposed=True),
}


def _gpu_case(name: str, D: int, dtype) -> Case:
    kw = dict(GPU_FEATURES[name])
    if kw.get("Dv") == "other":
        kw["Dv"] = 64 if D == 128 else 128
    if kw.get("fill") == "min":
        # The dtype's own finite fill: -1e9 is -inf in fp16, so eager's rows that see no key
        # would be NaN (and its dV with them), which leaves no eager error to bound by.
        kw["fill"] = torch.finfo(dtype).min
    return Case(D=D, dtype=dtype, **kw)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", list(GPU_FEATURES))
def test_gpu_cases(name, D, dtype):
    run_bwd_case(_gpu_case(name, D, dtype), device="cuda")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_every_config(D, causal):
    case = Case(B=2, Hq=4, Hkv=2, M=2048, N=2000, D=D, expr=CAUSAL if causal else "", dtype=BF16)
    q, k, v, *_ = case.tensors("cuda")
    bcall = backward_call(torch.empty_like(q), q, k, v, torch.empty_like(q), torch.zeros(2, 4, 2048, device="cuda"),
                          [], [], None, 0.125, 0.0, 0.0, -math.inf, case.expr, [], [])
    for cfg in sm90.backward_configs_for(bcall):
        run_bwd_case(case, device="cuda", config=cfg)


@pytest.mark.gpu
@needs_hopper
def test_gpu_direct_launch():
    case = Case(B=1, Hq=4, Hkv=4, M=1024, N=1024, D=128, dtype=BF16)
    run_bwd_case(case, device="cuda")
    before = launcher.direct_launches["attn_bwd_dkdv"], launcher.direct_launches["attn_bwd_dq"]
    run_bwd_case(case, device="cuda")
    assert (launcher.direct_launches["attn_bwd_dkdv"], launcher.direct_launches["attn_bwd_dq"]) == tuple(
        b + 1 for b in before)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_refuses_other_architectures():
    bcall = _bcall()
    f = bcall.forward
    moved = backward_call(bcall.grad_out.cuda(), f.q.cuda(), f.k.cuda(), f.v.cuda(), bcall.out.cuda(),
                          bcall.lse.cuda(), [], [], None, 0.125, 0.0, 0.0, -math.inf, "", [], [])
    assert "not 9.x" in sm90.backward_refusal(moved, capability=(8, 0))
    assert sm90.backward_refusal(moved, capability=(9, 0)) is None


def test_the_backward_choice_rule():
    """Served and preferred (D=128) on the sm_90 backward, else why the FA2 backward runs: on
    CPU tensors (no interpreter in the dispatch's rule) always the FA2 backward."""
    assert "CPU tensors" in sm90.backward_choice_refusal(_bcall(D=128))
    assert sm90.PREFERRED_BACKWARD_HEAD_DIMS


@pytest.mark.gpu
@needs_hopper
def test_gpu_the_choice_rule():
    def on_gpu(D):
        b = _bcall(D=D)
        f = b.forward
        return backward_call(b.grad_out.cuda(), f.q.cuda(), f.k.cuda(), f.v.cuda(), b.out.cuda(), b.lse.cuda(), [], [],
                             None, 0.125, 0.0, 0.0, -math.inf, "", [], [])
    for D in (64, 128):
        reason = sm90.backward_choice_refusal(on_gpu(D))
        assert (reason is None) == (D in sm90.PREFERRED_BACKWARD_HEAD_DIMS), reason
