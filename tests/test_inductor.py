"""With Inductor as the inner compiler (the default), fusepass fuses the attention, not Inductor.

Inductor has its own attention matcher (``fx_passes/fuse_attention.py``, counted in
``counters["inductor"]["fuse_attention"]``).  On CPU it does fire on this module under a plain
``torch.compile`` (asserted below, so that the "fired nothing" half of the test means
something); under fusepass it must find nothing left to fuse.

Inductor's FX-graph and AOTAutograd caches are turned off inside the test: on a cache hit the
joint-graph passes do not run again and Inductor's counter stays 0 for the wrong reason.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
from torch import nn

from conftest import assert_close_to_reference
from e2e_util import FUSED_BACKWARD_OP, FUSED_OP, count_op_calls, fused_count, rejected_count, unique_graphs


class Attention(nn.Module):
    """nanoGPT's attention core on contiguous q, k, v (the shape Inductor's patterns expect)."""

    def forward(self, q, k, v):
        # q, k, v: [B, H, N, D]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = torch.softmax(att, dim=-1)
        return att @ v


@contextlib.contextmanager
def _no_compile_caches():
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        yield


def _qkv(requires_grad: bool, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(2, 4, 32, 16, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_fusepass_fuses_before_inductor_matcher(training: bool):
    from torch._dynamo.utils import counters

    module = Attention()
    with _no_compile_caches(), torch.set_grad_enabled(training):
        # Precondition: plain Inductor fuses this attention on CPU.
        torch.compile(module, backend="inductor")(*_qkv(training))
        assert counters["inductor"]["fuse_attention"] >= 1, "Inductor's own matcher no longer fires here"

        torch._dynamo.reset()
        counters.clear()
        q, k, v = _qkv(training)
        compiled = torch.compile(module, backend="fusepass")  # default inner compiler: inductor
        got = compiled(q, k, v)
        if training:
            grad_out = torch.randn_like(got)
            got.backward(grad_out)
        assert fused_count() == 1, f"fusepass fused {fused_count()} sites"
        assert rejected_count() == 0
        assert counters["inductor"]["fuse_attention"] == 0, "Inductor's matcher fused something after fusepass"
        # ... and not because Inductor never ran: it compiled the graph (on CPU it calls the op
        # as an extern kernel, counted in "extern_calls").
        assert sum(counters["inductor"].values()) > 0, f"Inductor did not compile the graph: {dict(counters['inductor'])}"

        # Same numbers as eager (float64 rule).
        eager_in = _qkv(training)
        ref_in = _qkv(training, torch.float64)
        eager, ref = module(*eager_in), module(*ref_in)
        assert_close_to_reference(got.detach(), eager.detach(), ref.detach(), name="output")
        if training:
            eager.backward(grad_out)
            ref.backward(grad_out.double())
            for name, a, e, r in zip("qkv", (q, k, v), eager_in, ref_in):
                assert_close_to_reference(a.grad, e.grad, r.grad, name=f"grad of {name}")

        # The compiled code runs fusepass's op.
        graphs = unique_graphs()
        with count_op_calls() as calls:
            out = compiled(q, k, v)
            if training:
                out.backward(grad_out)
        assert unique_graphs() == graphs, "the second call compiled again"
        assert calls[FUSED_OP] == 1, dict(calls)
        assert calls[FUSED_BACKWARD_OP] == (1 if training else 0), dict(calls)
