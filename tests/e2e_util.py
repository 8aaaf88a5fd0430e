"""Helpers shared by the end-to-end tests (real models, nanoGPT, dynamic shapes, Inductor).

Kept out of ``conftest.py`` so that the fixtures there stay small; import what you need with
``from e2e_util import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

FUSED_OP = "fusepass::attention"  # counted with its twin without autograd (sites that need no grad call it)
INFERENCE_OP = "fusepass::attention_inference"
FUSED_BACKWARD_OP = "fusepass::attention_backward"


def fused_count() -> int:
    return counters["fusepass"]["attention_fused"]


def rejected_count() -> int:
    return counters["fusepass"]["attention_rejected"]


def unique_graphs() -> int:
    """Graphs Dynamo has compiled so far: it adds one each time a backend returns a compiled
    graph (``OutputGraph.call_user_compiler``), whatever the backend; recompiles count too."""
    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def count_op_calls():
    """Count how often each ``fusepass::*`` op really runs inside the block (at the dispatcher,
    through the profiler: whatever the inner compiler did with the graph, a call is a call).

    Use it around calls of an already-compiled model, so tracing is not counted.
    """
    calls: Counter[str] = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield calls
    for event in prof.key_averages():
        if event.key.startswith("fusepass::"):
            calls[event.key] += event.count
    calls[FUSED_OP] += calls.pop(INFERENCE_OP, 0)


@contextlib.contextmanager
def single_thread():
    """Run the block with one intra-op thread.

    NOTE: for loops of many tiny steps (the dropout statistics), more threads only add
    synchronization: measured 1.8 ms per forward+backward with one thread against 87 ms with
    two on a loaded 2-core machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def projection_loss(out: torch.Tensor, generator_seed: int = 1234) -> torch.Tensor:
    """A scalar loss with a non-degenerate gradient everywhere.

    ``out.sum()`` is a bad loss after a LayerNorm (its gradient into the normalized input is
    ~0); a fixed random projection is not.  The weights are drawn in float64 so that the fp32
    and fp64 runs use the same numbers.
    """
    return (out * projection_weights(out.shape, generator_seed).to(out.device, out.dtype)).sum()


def projection_weights(shape, generator_seed: int = 1234) -> torch.Tensor:
    """The float64 weights ``projection_loss`` multiplies by."""
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def fresh_leaves(t: dict, dtype: torch.dtype | None = None) -> dict:
    """Fresh leaves (float tensors cast to ``dtype`` when given) with the same requires_grad."""
    out = {}
    for name, x in t.items():
        y = x.detach().clone()
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        out[name] = y.requires_grad_(x.requires_grad)
    return out
