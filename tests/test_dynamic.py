"""Dynamic shapes: three sequence lengths compile at most twice, and every graph is fused.

How compiles are counted: ``counters["stats"]["unique_graphs"]``.  Dynamo adds one to it each
time a backend hands back a compiled graph (``OutputGraph.call_user_compiler``), recompiles
included, whatever the backend is.  It needs no wrapper around the backend (a wrapper would
have to re-implement how ``torch.compile`` passes ``options``) and it does not depend on how
fusepass itself is written.  The expected sequence is the usual automatic-dynamic one: the
first length compiles a static graph, the second marks the sequence dimension dynamic and
compiles once more, the third reuses that graph.

"Every call fused" is checked twice: at compile time (``attention_fused`` equals the number of
attention layers times the number of graphs: each graph fused all of its sites) and at run time
(each call, at each length, runs ``fusepass::attention`` once per layer and
``fusepass::attention_backward`` once per layer).
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_close_to_reference
from e2e_util import (
    FUSED_BACKWARD_OP, FUSED_OP, count_op_calls, fused_count, projection_loss, rejected_count, unique_graphs,
)
from nanogpt import GPT, GPTConfig

OPTIONS = {"inner": "aot_eager"}
SEQ_LENS = (16, 24, 40)
BATCH = 2
VOCAB = 128


def _nanogpt():
    model = GPT(GPTConfig(vocab_size=VOCAB))
    return model, model.config.n_layer, lambda out: out


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0, attn_implementation="eager",
    )
    return transformers.LlamaModel(cfg), cfg.num_hidden_layers, lambda out: out.last_hidden_state


@pytest.mark.parametrize("build", [_nanogpt, _llama], ids=["nanogpt", "llama"])
def test_three_lengths_compile_at_most_twice_all_fused(build):
    torch.manual_seed(0)
    model, n_layers, output = build()
    model.train()  # every dropout is 0: the training graph with deterministic numbers
    compiled_src = copy.deepcopy(model)
    reference = copy.deepcopy(model).double()
    compiled = torch.compile(compiled_src, backend="fusepass", options=OPTIONS)
    inputs = {n: torch.randint(0, VOCAB, (BATCH, n)) for n in SEQ_LENS}

    def forward_backward(fn, m, idx):
        # fn: what to call (the compiled wrapper or the module); m: the module holding the parameters
        m.zero_grad(set_to_none=True)
        out = output(fn(idx))
        projection_loss(out).backward()
        return out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    for n in SEQ_LENS:
        got, got_grads = forward_backward(compiled, compiled_src, inputs[n])
        eager, eager_grads = forward_backward(model, model, inputs[n])
        ref, ref_grads = forward_backward(reference, reference, inputs[n])
        assert_close_to_reference(got, eager, ref, name=f"output at N={n}")
        assert got_grads.keys() == ref_grads.keys()
        for name in ("q_proj", "k_proj", "v_proj", "c_attn"):
            for pname in (p for p in ref_grads if name in p):
                assert_close_to_reference(got_grads[pname], eager_grads[pname], ref_grads[pname],
                                          name=f"grad of {pname} at N={n}")

    graphs = unique_graphs()
    assert 1 <= graphs <= 2, f"{len(SEQ_LENS)} sequence lengths compiled {graphs} graphs"
    assert rejected_count() == 0, f"{rejected_count()} attention sites rejected"
    assert fused_count() == n_layers * graphs, (
        f"fused {fused_count()} sites over {graphs} graphs of {n_layers} attention layers each"
    )

    # Run time: every length goes through the fused op, with no further compile.
    for n in SEQ_LENS:
        with count_op_calls() as calls:
            forward_backward(compiled, compiled_src, inputs[n])
        assert calls[FUSED_OP] == n_layers, f"N={n}: {dict(calls)}"
        assert calls[FUSED_BACKWARD_OP] == n_layers, f"N={n}: {dict(calls)}"
    assert unique_graphs() == graphs, "a repeated length compiled again"


def _gqa_attention(q, k, v):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.softmax(q @ k.transpose(-1, -2) / q.size(-1) ** 0.5, dim=-1) @ v


def _repeat_kv_attention(q, k, v):
    b, hkv, n, d = k.shape
    g = q.shape[1] // hkv
    k = k[:, :, None].expand(b, hkv, g, n, d).reshape(b, hkv * g, n, d)
    v = v[:, :, None].expand(b, hkv, g, n, v.shape[-1]).reshape(b, hkv * g, n, v.shape[-1])
    return torch.softmax(q @ k.transpose(-1, -2) / q.size(-1) ** 0.5, dim=-1) @ v


# (batch, query heads, kv heads, query length, key length, head dim): a shape sweep of the
# kind that made every site refused once Dynamo turned batch, heads and head dim symbolic.
SWEEP = [(2, 4, 2, 8, 9, 16), (3, 6, 3, 5, 11, 32), (1, 8, 2, 7, 7, 8), (2, 8, 4, 9, 13, 64), (2, 6, 2, 3, 5, 24)]


@pytest.mark.parametrize("fn", [_gqa_attention, _repeat_kv_attention])
def test_symbolic_batch_heads_and_head_dim_stay_fused(fn):
    compiled = torch.compile(fn, backend="fusepass", options=OPTIONS)
    for b, hq, hkv, m, n, d in SWEEP:
        q = torch.randn(b, hq, m, d, dtype=torch.float64).requires_grad_()
        k = torch.randn(b, hkv, n, d, dtype=torch.float64).requires_grad_()
        v = torch.randn(b, hkv, n, d, dtype=torch.float64).requires_grad_()
        ref = fn(q, k, v)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        args32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
        eager = fn(*args32)
        eager_grads = torch.autograd.grad(eager.square().sum(), args32)
        args = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = compiled(*args)
        grads = torch.autograd.grad(out.square().sum(), args)
        assert_close_to_reference(out, eager, ref)
        for name, g, e, r in zip("qkv", grads, eager_grads, ref_grads):
            assert_close_to_reference(g, e, r, name=f"grad {name} at {(b, hq, hkv, m, n, d)}")
    assert rejected_count() == 0, "a shape change turned fusion off"
    assert fused_count() == unique_graphs() <= 3
