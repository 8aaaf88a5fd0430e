"""nanoGPT's hand-written attention (tril buffer + masked_fill + softmax + dropout), fused.

Eval: dropout is a no-op and the compiled model matches eager by the float64 rule.
Train: dropout is fused into the op, so the numbers cannot equal eager's (different random
draws); instead a seeded run is reproducible, and the dropout is checked statistically:
E[output] and E[gradient] over many seeds equal the eval (no-dropout) values, the spread is
eager's spread, and the backward uses the forward's keep-mask.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_reference
from e2e_util import (
    FUSED_BACKWARD_OP, FUSED_OP, count_op_calls, fused_count, projection_loss, projection_weights,
    rejected_count, single_thread, unique_graphs,
)
from nanogpt import GPT, CausalSelfAttention, GPTConfig

OPTIONS = {"inner": "aot_eager"}
BATCH, SEQ = 2, 24


def _idx(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, GPTConfig.vocab_size, (BATCH, seq))


def _assert_all_fused(n_sites: int) -> None:
    assert fused_count() == n_sites, f"fused {fused_count()} sites, the model has {n_sites} attention blocks"
    assert rejected_count() == 0, f"{rejected_count()} attention sites rejected"


def test_eval_matches_eager():
    config = GPTConfig(dropout=0.1)  # eval mode: dropout must be a no-op
    torch.manual_seed(0)
    model = GPT(config).eval()
    compiled_src = copy.deepcopy(model)
    reference = copy.deepcopy(model).double()
    idx = _idx()
    compiled = torch.compile(compiled_src, backend="fusepass", options=OPTIONS)

    got = compiled(idx)
    projection_loss(got).backward()
    _assert_all_fused(config.n_layer)
    eager = model(idx)
    projection_loss(eager).backward()
    ref = reference(idx)
    projection_loss(ref).backward()

    assert_close_to_reference(got.detach(), eager.detach(), ref.detach(), name="logits")
    eager_params = dict(model.named_parameters())
    ref_params = dict(reference.named_parameters())
    for name, p in compiled_src.named_parameters():
        assert p.grad is not None, name
        assert_close_to_reference(p.grad, eager_params[name].grad, ref_params[name].grad, name=f"grad of {name}")

    graphs = unique_graphs()
    with count_op_calls() as calls:
        projection_loss(compiled(idx)).backward()
    assert unique_graphs() == graphs, "the second call compiled again"
    assert calls[FUSED_OP] == config.n_layer, dict(calls)
    assert calls[FUSED_BACKWARD_OP] == config.n_layer, dict(calls)


def test_train_dropout_seeded_run_is_reproducible():
    config = GPTConfig(dropout=0.1)
    torch.manual_seed(0)
    model = GPT(config).train()
    compiled = torch.compile(model, backend="fusepass", options=OPTIONS)
    idx, targets = _idx(), _idx()

    def run(seed: int):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        logits = compiled(idx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits1, loss1, grads1 = run(seed=1)
    _assert_all_fused(config.n_layer)
    graphs = unique_graphs()
    with count_op_calls() as calls:
        logits2, loss2, grads2 = run(seed=1)
    logits3, _, grads3 = run(seed=2)
    assert unique_graphs() == graphs, "a later call compiled again"
    assert calls[FUSED_OP] == config.n_layer, dict(calls)
    assert calls[FUSED_BACKWARD_OP] == config.n_layer, dict(calls)

    assert torch.isfinite(loss1) and torch.isfinite(logits1).all()
    assert torch.equal(logits1, logits2), "same seed, different outputs"
    assert torch.equal(loss1, loss2)
    for name, g in grads1.items():
        assert torch.isfinite(g).all(), f"non-finite gradient of {name}"
        assert torch.equal(g, grads2[name]), f"same seed, different gradient of {name}"
    assert not torch.equal(logits1, logits3), "a different seed gave the same dropout"
    q_weight = "h.0.attn.c_attn.weight"
    assert not torch.equal(grads1[q_weight], grads3[q_weight])


# --- Dropout statistics, on one CausalSelfAttention whose only randomness is attn_dropout. ---
#
# out = c_proj((P * keep / (1 - p)) @ v) is linear in the keep-mask, so E[out] over the mask is
# exactly the eval output, and with a loss linear in out the same holds for every gradient.

SAMPLES = 256
# Bound for |mean of SAMPLES draws - expectation| in units of the standard error, per element.
# 6 sigma over ~2k elements: a false alarm has probability ~4e-6 for a correct dropout (and the
# seeds are fixed, so the test is deterministic anyway).  A missing 1/(1-p) rescale moves the
# mean by p/(1-p) of the value, hundreds of standard errors here.
SIGMAS = 6.0


def _attention_module(p: float) -> CausalSelfAttention:
    torch.manual_seed(0)
    module = CausalSelfAttention(GPTConfig(dropout=p))
    module.resid_dropout.p = 0.0  # only the attention weights are dropped
    return module


def _samples(fn, n: int):
    outs, grads = [], []
    for seed in range(n):
        torch.manual_seed(1000 + seed)
        out, grad = fn()
        outs.append(out)
        grads.append(grad)
    return torch.stack(outs).double(), torch.stack(grads).double()


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_train_dropout_expectation_and_spread_match_eager(p: float):
    module = _attention_module(p)
    x = torch.randn(BATCH, 16, module.n_embd)

    def step(m):
        def fn():
            m.zero_grad(set_to_none=True)
            out = m(x)
            projection_loss(out).backward()
            return out.detach(), m.c_attn.weight.grad.clone()
        return fn

    expected_module = copy.deepcopy(module).eval()
    expected_out, expected_grad = step(expected_module)()

    compiled = torch.compile(copy.deepcopy(module).train(), backend="fusepass", options=OPTIONS)
    with single_thread():
        fused_out, fused_grad = _samples(step(compiled), SAMPLES)
        _assert_all_fused(1)
        eager_out, eager_grad = _samples(step(copy.deepcopy(module).train()), SAMPLES)

    for name, fused, eager, expected in (
        ("output", fused_out, eager_out, expected_out),
        ("grad of c_attn.weight", fused_grad, eager_grad, expected_grad),
    ):
        # Dropout is really applied: single draws differ from the eval values.
        assert (fused[0] - expected).abs().max() > 1e-3, f"{name}: a train-mode draw equals eval"
        # Unbiased: the mean over draws is the eval value within SIGMAS standard errors.
        stderr = fused.std(dim=0) / math.sqrt(SAMPLES)
        dev = (fused.mean(dim=0) - expected.double()).abs()
        worst = (dev / (stderr + 1e-12)).max().item()
        assert (dev <= SIGMAS * stderr + 1e-6).all(), f"{name}: mean is {worst:.1f} standard errors off eval"
        # The right p: the total variance matches eager dropout's (variance ~ p / (1 - p)).
        # Measured: eager against eager on other seeds stays within 2% of 1 at p = 0.1 and 0.6;
        # p off by 10% (0.1 vs 0.11) moves the ratio by 11%.
        ratio = (fused.var(dim=0).sum() / eager.var(dim=0).sum()).item()
        assert 0.92 < ratio < 1.08, f"{name}: variance over draws is {ratio:.3f} x eager dropout's"


def test_train_dropout_backward_uses_the_forward_mask():
    """One seeded draw: the loss is linear in v, hence in (W_v, b_v), so
    <dL/dW_v, W_v> + <dL/db_v, b_v> = L - <c_proj.bias, sum of the loss weights>
    holds for that draw only if the backward drops exactly what the forward dropped."""
    p = 0.5
    module = _attention_module(p)
    x = torch.randn(BATCH, 16, module.n_embd)
    C = module.n_embd

    def residual(m) -> tuple[float, float]:
        torch.manual_seed(7)
        m.zero_grad(set_to_none=True)
        out = m(x)
        loss = projection_loss(out)
        loss.backward()
        w = m.c_attn.weight.double()[2 * C :]
        b = m.c_attn.bias.double()[2 * C :]
        gw = m.c_attn.weight.grad.double()[2 * C :]
        gb = m.c_attn.bias.grad.double()[2 * C :]
        loss_weights = projection_weights(out.shape).to(out.dtype).double()
        const = (m.c_proj.bias.double() * loss_weights.sum(dim=(0, 1))).sum()
        lhs = (gw * w).sum() + (gb * b).sum()
        rhs = loss.double() - const
        return (lhs - rhs).abs().item(), rhs.abs().item()

    eager_res, scale = residual(copy.deepcopy(module).train())
    compiled = torch.compile(copy.deepcopy(module).train(), backend="fusepass", options=OPTIONS)
    fused_res, fused_scale = residual(compiled)
    _assert_all_fused(1)
    # fp32 rounding leaves ~1e-6 relative; a backward with another mask is off by O(p) relative.
    bound = 4 * eager_res + 1e-5 * max(scale, fused_scale)
    assert fused_res <= bound, f"residual {fused_res:.3e} > {bound:.3e}: backward mask differs from forward's"
