"""Run options travel with the op: what a compile asked for (autotune, the interpreter) is in
the op calls it emits and in their backward, so two models compiled with different options in
one process each keep theirs, and explain never changes a compiled model."""

from __future__ import annotations

import pytest
import torch

import fusepass
from fusepass.options import Options, RunOptions

pytest.importorskip("triton")


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v


@pytest.fixture
def launches(monkeypatch, tmp_path):
    """Which implementation each op call ran with the autotune option of its call, and what
    the autotuner was asked (once per launch plan: a repeated call reuses its plan)."""
    import fusepass.kernels.forward as kernels
    import fusepass.ops.reference as reference
    from fusepass.autotune import provider

    monkeypatch.delenv("FUSEPASS_INTERPRET", raising=False)
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path))
    seen: list[tuple] = []
    real_kernels, real_reference = kernels.attention_forward, reference.attention_forward
    monkeypatch.setattr(kernels, "attention_forward", lambda call, **kw: seen.append(("kernels", call.run.autotune)) or real_kernels(call, **kw))
    monkeypatch.setattr(reference, "attention_forward",
                        lambda *a, **kw: seen.append(("reference",)) or real_reference(*a, **kw))
    # The op hands the launchers the autotuner's provider; record what it is asked instead.
    monkeypatch.setattr(provider, "kernel_config_provider",
                        lambda query: seen.append((query.direction, query.autotune)) and None)
    return seen


def test_two_compiles_keep_their_own_options(launches):
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    interpreted = torch.compile(attention, backend="fusepass",
                                options={"inner": "aot_eager", "interpret": True, "autotune": False})
    torch.testing.assert_close(interpreted(q, k, v), attention(q, k, v))
    assert launches == [("kernels", False), ("fwd", False)]

    launches.clear()
    plain = torch.compile(lambda q, k, v: attention(q, k, v) * 1.0, backend="fusepass", options={"inner": "aot_eager"})
    plain(q, k, v)
    assert launches == [("reference",)]  # CPU tensors, no interpreter asked for

    launches.clear()
    interpreted(q, k, v)  # the later compile changed nothing for the first one
    assert launches == [("kernels", False)]

    launches.clear()
    tuned = torch.compile(lambda q, k, v: attention(q, k, v) + 0.0, backend="fusepass",
                          options={"inner": "aot_eager", "interpret": True, "autotune": True})
    tuned(q, k, v)
    interpreted(q, k, v)
    assert launches == [("kernels", True), ("fwd", True), ("kernels", False)]


def test_the_backward_runs_as_its_forward_was_asked(launches):
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    fn = torch.compile(attention, backend="fusepass", options={"inner": "aot_eager", "interpret": True, "autotune": False})
    fn(q, k, v).sum().backward()
    assert ("bwd", False) in launches and ("reference",) not in launches
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention(*leaves).sum().backward()
    for t, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(t.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_explain_does_not_change_a_compiled_model(launches):
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    plain = torch.compile(attention, backend="fusepass", options={"inner": "aot_eager"})
    plain(q, k, v)
    report = fusepass.explain(lambda q, k, v: attention(q, k, v) * 2.0, q, k, v,
                              options={"inner": "aot_eager", "interpret": True})
    assert report.sites[0].runs_on.startswith("triton, prefill family")
    launches.clear()
    plain(q, k, v)
    assert launches == [("reference",)]


def test_run_options_round_trip_and_refuse_nonsense():
    for run in (RunOptions(), RunOptions(autotune=False), RunOptions(autotune=True, interpret=True)):
        assert RunOptions.decode(run.encode()) == run
    assert Options(interpret=False, autotune=True).run() == RunOptions(autotune=True, interpret=None)
    with pytest.raises(ValueError, match="run option"):
        RunOptions.decode("autotune=yes")
    with pytest.raises(ValueError, match="run option"):
        RunOptions.decode("fast=1")
