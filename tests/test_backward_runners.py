"""Backward runners (kernels/backward.py ``bind_plan``, ops/dispatch.py): a training step calls
each layer's backward once a step with the same signature, so from its second call the
backward launches with everything but the tensors bound, skipping the call's validation, the
family rules and the plan lookup.

Under Triton's interpreter (CPU) a runner launches the same kernels as the full path: its
gradients for new tensors of the signature are the full path's for them, bit for bit, for both
backward families.  The dispatch's binding logic runs with the CUDA check stood in for.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

pytest.importorskip("triton")

from fusepass.kernels import backward, launch_common, sm90  # noqa: E402
from fusepass.ops import dispatch  # noqa: E402
from fusepass.ops.dispatch import backward_call, forward_call  # noqa: E402

from kernel_cases import Case  # noqa: E402

CAUSAL = "j <= i + (N - M)"
BF16, FP16 = torch.bfloat16, torch.float16

CASES = {
    "gqa_causal": Case(B=2, Hq=4, Hkv=2, M=33, N=50, D=64, expr=CAUSAL, dtype=BF16),
    "bias_store_and_atomic": Case(B=2, M=33, N=40, D=64, bias_shapes=((2, 2, 33, 40), (2, 1, 1, 40)), dtype=FP16),
    "finite_fill_bias": Case(M=20, N=24, D=64, bias_shapes=((1, 2, 20, 24),), expr=CAUSAL, fill=-1e9, dtype=FP16),
    "dropout": Case(M=40, N=50, D=64, dropout_p=0.25, dtype=FP16),
    "transposed_strides": Case(B=2, Hq=4, Hkv=2, M=33, N=40, D=64, transposed=True, dtype=BF16),
}

@pytest.fixture(autouse=True)
def _fresh_plans(monkeypatch):
    # Plans are per process: a signature another test launched would be fitted already.
    monkeypatch.setattr(backward, "_plans", launch_common.PlanCache())
    monkeypatch.setattr(sm90, "_bwd_plans", launch_common.PlanCache())


FAMILIES = {
    "fa2": (backward.runner, backward.attention_backward),
    "sm90": (sm90.backward_runner, sm90.attention_backward),
}


def _feats(case: Case, seed=None):
    seed = case.tensors("cpu")[5] if seed is None else seed
    return (seed, case.D ** -0.5, case.softcap, case.dropout_p, case.fill, case.expr, list(case.args))


def _bcall(case: Case, family: str):
    """A backward call of ``case`` with fresh tensors (its forward run by the family's forward)."""
    q, k, v, biases, masks, seed = case.tensors("cpu")
    feats = _feats(case, seed)
    fwd = sm90.attention_forward if family == "sm90" else dispatch.run_forward
    out, lse = fwd(forward_call(q, k, v, biases, masks, *feats))
    do = torch.randn_like(out)
    return backward_call(do, q, k, v, out, lse, biases, masks, *feats, [case.bias_grad] * len(biases))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


def _runner_args(bcall):
    f = bcall.forward
    return bcall.grad_out, f.q, f.k, f.v, bcall.out, bcall.lse, f.biases, f.masks, f.seed


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(CASES))
def test_a_runner_gives_the_full_path_s_gradients_for_new_tensors(name, family, monkeypatch):
    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    bind, full = FAMILIES[family]
    case = CASES[name]
    first = _bcall(case, family)
    assert bind(first) is None  # no kernel has launched (fitted its config) yet
    full(first)
    run = bind(first)
    assert run is not None
    later = _bcall(case, family)
    want = full(later)
    before = dict(launch_common.launches), sm90.launches_sm90["bwd"]
    got = run(*_runner_args(later))
    kernels = ["dkdv", "dq"] + ["rowstats"] * (case.fill != -math.inf and bool(case.bias_shapes))
    for kernel in set(kernels):
        assert launch_common.launches[kernel] - before[0].get(kernel, 0) == kernels.count(kernel), kernel
    assert sm90.launches_sm90["bwd"] - before[1] == (family == "sm90")
    for label, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        assert _same(a, b), f"{label}: the runner's gradient differs from the full path's"
    assert len(got[3]) == len(want[3]) and all(_same(a, b) for a, b in zip(got[3], want[3]))


def test_a_bool_mask_s_block_map_keeps_the_backward_off_runners(monkeypatch):
    # The dK/dV and dQ block maps are read from the mask's values per call.
    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    bcall = _bcall(Case(B=2, M=33, N=40, D=64, mask_shapes=((2, 1, 33, 40),), dtype=BF16), "fa2")
    backward.attention_backward(bcall)
    assert backward.runner(bcall) is None


def test_the_sm90_backward_runner_sends_a_misaligned_view_to_the_full_path(monkeypatch):
    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    case = CASES["gqa_causal"]
    first = _bcall(case, "sm90")
    sm90.attention_backward(first)
    run = sm90.backward_runner(first)
    grad_out, q, k, v, out, lse, biases, masks, seed = _runner_args(first)
    # Views with q's signature (shape and strides): one at an aligned offset, one 2 bytes off.
    flat = torch.randn(q.numel() + 64, dtype=q.dtype)
    aligned_view = torch.as_strided(flat, q.shape, q.stride(), storage_offset=8)
    shifted = torch.as_strided(flat, q.shape, q.stride(), storage_offset=1)
    assert aligned_view.data_ptr() % sm90.TMA_ALIGN == 0 and shifted.data_ptr() % sm90.TMA_ALIGN
    want = sm90.attention_backward(backward_call(grad_out, aligned_view, k, v, out, lse, biases, masks, *_feats(case), []))
    got = run(grad_out, aligned_view, k, v, out, lse, biases, masks, seed)
    assert got is not None and all(_same(a, b) for a, b in zip(got[:3], want[:3]))
    assert run(grad_out, shifted, k, v, out, lse, biases, masks, seed) is None


def _op_args(do, q, out, lse):
    return (do, q, q, q, out, lse, [], [], None, 0.125, 0.0, 0.0, float("-inf"), CAUSAL, [], [], "")


def test_the_dispatch_binds_a_backward_runner_on_a_signature_s_second_call(monkeypatch):
    # CPU tensors never take runners (the interpreter plans per call); here the binding logic
    # runs with the CUDA check and the runner factory stood in for.
    from fusepass.kernels import decode

    class Cuda(torch.Tensor):
        is_cuda = True

    bound, served = [], []

    def runner_for(bcall):
        bound.append(bcall)

        def run(grad_out, q, k, v, out, lse, biases, masks, seed):
            served.append(q)
            return dispatch.run_backward(backward_call(grad_out, q, k, v, out, lse, biases, masks, seed, 0.125,
                                                       0.0, 0.0, float("-inf"), CAUSAL, [], []))
        return run

    monkeypatch.setattr(dispatch, "_backward_runner_for", runner_for)
    monkeypatch.setattr(dispatch, "_backward_runners", {})
    monkeypatch.setattr(decode, "capturing", lambda q: False)  # no CUDA to ask
    q = torch.randn(1, 2, 8, 16).as_subclass(Cuda)
    out, lse = dispatch.run_forward(forward_call(q, q, q, [], [], None, 0.125, 0.0, 0.0, float("-inf"), CAUSAL, []))
    do = torch.randn_like(out)
    results = [dispatch.backward(*_op_args(do, q, out, lse)) for _ in range(4)]
    assert len(bound) == 1 and len(served) == 2  # call 1 marks, call 2 binds, calls 3 and 4 are served
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r[:3], results[0][:3]))
    # Another signature (a transposed grad_out) is its own key.
    dispatch.backward(*_op_args(do.transpose(2, 3).contiguous().transpose(2, 3), q, out, lse))
    assert len(bound) == 1
    monkeypatch.setattr(dispatch, "_backward_runner_for", lambda bcall: None)  # no runner possible: asked once
    r = torch.randn(1, 2, 5, 16).as_subclass(Cuda)
    out_r, lse_r = dispatch.run_forward(forward_call(r, r, r, [], [], None, 0.125, 0.0, 0.0, float("-inf"), CAUSAL, []))
    do_r = torch.randn_like(out_r)
    for _ in range(3):
        dispatch.backward(*_op_args(do_r, r, out_r, lse_r))
    key = dispatch.backward_runner_key(*_op_args(do_r, r, out_r, lse_r))
    assert dispatch._backward_runners[key] is dispatch._UNBOUND


def test_the_backward_runner_key_tells_apart_what_the_backward_call_adds():
    q = torch.randn(1, 2, 8, 16)
    out, lse = dispatch.run_forward(forward_call(q, q, q, [], [], None, 0.125, 0.0, 0.0, float("-inf"), CAUSAL, []))
    do = torch.randn_like(out)
    base = dispatch.backward_runner_key(*_op_args(do, q, out, lse))
    assert dispatch.backward_runner_key(*_op_args(do.clone(), q.clone(), out.clone(), lse.clone())) == base
    others = [
        _op_args(do.transpose(2, 3).contiguous().transpose(2, 3), q, out, lse),  # grad_out's strides
        _op_args(do.half(), q, out, lse),  # grad_out's dtype
        _op_args(do, q, out.transpose(2, 3).contiguous().transpose(2, 3), lse),  # out's strides
        _op_args(do, q, out, lse.double()),  # lse's dtype
    ]
    keys = [dispatch.backward_runner_key(*a) for a in others]
    assert base not in keys and len(set(keys)) == len(keys)
    with_bias = list(_op_args(do, q, out, lse))
    with_bias[6] = [torch.randn(1, 2, 8, 8)]
    keys = {dispatch.backward_runner_key(*with_bias[:15], flags, "") for flags in ([True], [False])}
    assert len(keys) == 2  # which biases want a gradient


class _BiasedCausal(torch.nn.Module):
    """Attention with a learned additive bias (a gradient for it) and a causal mask."""

    def __init__(self, heads: int, n: int):
        super().__init__()
        self.bias = torch.nn.Parameter(0.1 * torch.randn(1, heads, n, n))

    def forward(self, q, k, v):
        n = q.size(-2)
        s = q @ k.transpose(-1, -2) * q.size(-1) ** -0.5 + self.bias
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).tril().logical_not(), float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])  # 128 takes the sm_90 backward on Hopper
def test_gpu_training_steps_served_by_backward_runners_match_float64(head_dim):
    from conftest import assert_close_to_reference

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    heads, n = 4, 384
    model = _BiasedCausal(heads, n).cuda()
    compiled = torch.compile(model, backend="fusepass")
    bound_before = sum(1 for r in dispatch._backward_runners.values()
                       if r is not dispatch._SEEN and r is not dispatch._UNBOUND)
    for step in range(4):  # step 1 marks the signature, step 2 binds, steps 3 and 4 are served
        q, k, v = (torch.randn(2, heads, n, head_dim, device="cuda", dtype=BF16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn(2, heads, n, head_dim, device="cuda", dtype=BF16)
        model.bias.grad = None
        out = compiled(q, k, v)
        got = torch.autograd.grad(out, (q, k, v, model.bias), do)
        model.bias.grad = None
        eager = torch.autograd.grad(model(q, k, v), (q, k, v, model.bias), do)
        ref_model = _BiasedCausal(heads, n).cuda().double()
        ref_model.bias.data.copy_(model.bias.data.double())
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = torch.autograd.grad(ref_model(q64, k64, v64), (q64, k64, v64, ref_model.bias), do.double())
        for name, a, e, r in zip(("dq", "dk", "dv", "dbias"), got, eager, ref):
            assert_close_to_reference(a, e, r, name=f"step {step} {name}")
    bound = sum(1 for r in dispatch._backward_runners.values() if r is not dispatch._SEEN and r is not dispatch._UNBOUND)
    assert bound > bound_before, "no backward runner was bound for the repeated training step"
