"""Shared fixtures: seeding, the gpu marker, and a verbose closeness check."""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    yield


def assert_close_to_reference(actual, eager, reference, *, factor: float = 4.0, floor: float = None, name="output"):
    """FlexAttention's rule: the fused error against a float64 reference may be at most
    ``factor`` times eager's own error in that dtype (plus a floor for exact-zero cases)."""
    actual64, eager64, ref64 = actual.double(), eager.double(), reference.double()
    assert torch.isnan(actual64).eq(torch.isnan(ref64)).all(), f"{name}: NaN pattern differs from reference"
    finite = ~torch.isnan(ref64)
    fused_err = (actual64 - ref64)[finite].abs().max().item() if finite.any() else 0.0
    # Eager's own error where it has one: a NaN of eager's where the reference is finite (a
    # low-precision overflow) would make the bound NaN and the check vacuous.
    both = finite & ~torch.isnan(eager64)
    eager_err = (eager64 - ref64)[both].abs().max().item() if both.any() else 0.0
    if floor is None:
        floor = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[actual.dtype]
    bound = factor * eager_err + floor
    if fused_err > bound:
        where = ((actual64 - ref64).abs() * finite).flatten().argmax().item()
        raise AssertionError(
            f"{name}: max error {fused_err:.3e} vs reference exceeds {factor} x eager's {eager_err:.3e} "
            f"+ {floor:.1e}; worst at flat index {where}: got {actual64.flatten()[where].item():.6f}, "
            f"reference {ref64.flatten()[where].item():.6f}"
        )
