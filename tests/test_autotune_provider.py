"""The provider's decisions that need no GPU: autotune off, CPU tensors, keys from tensors."""

from __future__ import annotations

import pytest
import torch

from fusepass.autotune import provider
from fusepass.autotune.config import KernelConfig
from fusepass.options import Options

DEFAULT = KernelConfig(64, 64, 4, 2)


def _never(cfg):
    raise AssertionError("nothing may be timed here")


@pytest.fixture(autouse=True)
def _reset_provider():
    yield
    provider.configure(None)


@pytest.mark.parametrize("options", [Options(autotune=False), Options(autotune=True), Options(interpret=True)])
def test_cpu_or_autotune_off_gives_the_default_without_timing(options):
    q = k = v = torch.randn(1, 2, 8, 16)
    cfg = provider.select_config("fwd", q, k, v, features="", template_hash="t", default=DEFAULT,
                                 bench_fn=_never, options=options)
    assert cfg is DEFAULT


def test_configure_switches_autotune_off(monkeypatch):
    monkeypatch.setenv("FUSEPASS_AUTOTUNE", "0")
    provider.configure(None)
    assert not provider.autotune_enabled()
    provider.configure(Options(autotune=True))
    assert provider.autotune_enabled()
    assert not provider.autotune_enabled(Options(autotune=False))


def test_problem_shape_and_flops():
    q, k, v = torch.empty(2, 8, 100, 64), torch.empty(2, 2, 300, 64), torch.empty(2, 2, 300, 32)
    shape = dict(provider.problem_shape(q, k, v))
    assert shape == {"B": 2, "Hq": 8, "Hkv": 2, "M": 100, "N": 300, "D": 64, "Dv": 32}
    fwd = provider.attention_flops("fwd", tuple(shape.items()))
    assert fwd == 2 * 2 * 8 * 100 * 300 * (64 + 32)
    assert provider.attention_flops("bwd", tuple(shape.items())) == 2.5 * fwd


def test_random_like_makes_real_tensors_from_fake_ones():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, 3, 5, 8, dtype=torch.bfloat16).transpose(1, 2)
        mask = torch.empty(1, 1, 5, 7, dtype=torch.bool)
    real = provider.random_like(fake)
    assert type(real) is torch.Tensor
    assert real.shape == fake.shape and real.stride() == fake.stride() and real.dtype == torch.bfloat16
    assert real.float().std() > 0.5  # random, not zeros
    assert provider.random_like(mask).dtype == torch.bool
    assert provider.random_like(None) is None


def test_feature_signature_names_structural_fields_only():
    spec_mod = pytest.importorskip("fusepass.kernels.spec")
    plain = spec_mod.KernelSpec(head_dim=128, v_head_dim=128)
    causal = spec_mod.KernelSpec(expr="j <= i", softcap=True, head_dim=64, v_head_dim=64)
    assert provider.feature_signature(plain) == ""
    sig = provider.feature_signature(causal)
    assert "softcap" in sig and "j <= i" in sig and "head_dim" not in sig


def test_kernel_hook_gives_none_on_cpu():
    heur = pytest.importorskip("fusepass.kernels.heuristics")
    spec_mod = pytest.importorskip("fusepass.kernels.spec")
    query = heur.ConfigQuery("fwd", spec_mod.KernelSpec(), torch.float16, 1, 2, 2, 64, 64, torch.device("cpu"))
    assert provider.kernel_config_provider(query) is None
