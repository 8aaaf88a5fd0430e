"""The provider's decisions that need no GPU: autotune off, CPU tensors, keys from tensors."""

from __future__ import annotations

import pytest
import torch

from fusepass.autotune import provider
from fusepass.autotune.config import ForwardConfig, config_type
from fusepass.options import Options
from fusepass.ops.dispatch import backward_call, forward_call

DEFAULT = ForwardConfig(64, 64, 4, 2)


def _never(cfg):
    raise AssertionError("nothing may be timed here")


@pytest.fixture(autouse=True)
def _reset_provider():
    yield
    provider.configure(None)


@pytest.mark.parametrize("autotune", [False, None])
def test_autotune_off_or_cpu_gives_no_config_without_timing(autotune, monkeypatch):
    heur = pytest.importorskip("fusepass.kernels.heuristics")
    spec_mod = pytest.importorskip("fusepass.kernels.spec")
    monkeypatch.setattr(provider, "_kernel_bench_fn", _never)
    provider.configure(Options(autotune=True))
    spec = spec_mod.KernelSpec(head_dim=64, v_head_dim=64)
    cpu = heur.ConfigQuery("fwd", spec, torch.bfloat16, 1, 2, 2, 128, 128, torch.device("cpu"), autotune=autotune)
    assert provider.kernel_config_provider(cpu) is None  # CPU launches are never timed
    monkeypatch.setattr(provider, "TIMED_DEVICE_TYPES", ("cpu",))
    provider.configure(Options(autotune=autotune is not False))
    off = heur.ConfigQuery("fwd", spec, torch.bfloat16, 1, 2, 2, 128, 128, torch.device("cpu"), autotune=False)
    assert provider.kernel_config_provider(off) is None  # the call's own option wins


def test_configure_switches_autotune_off(monkeypatch):
    monkeypatch.setenv("FUSEPASS_AUTOTUNE", "0")
    provider.configure(None)
    assert not provider.autotune_enabled()
    provider.configure(Options(autotune=True))
    assert provider.autotune_enabled()
    assert not provider.autotune_enabled(Options(autotune=False))
    assert provider.autotune_enabled(Options(autotune=True, interpret=True))  # interpret is about CPU tensors


def test_flops():
    shape = {"B": 2, "Hq": 8, "Hkv": 2, "M": 100, "N": 300, "D": 64, "Dv": 32}
    fwd = provider.attention_flops("fwd", tuple(shape.items()))
    assert fwd == 2 * 2 * 8 * 100 * 300 * (64 + 32)
    assert provider.attention_flops("bwd", tuple(shape.items())) == 2.5 * fwd


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


def test_kernel_hook_end_to_end_through_the_interpreter(monkeypatch, tmp_path):
    """The launchers' hook on CPU tensors with Triton's interpreter standing in for the GPU:
    key from the query, pruned candidates plus the default, each timed by really launching the
    kernel, the winner cached and served again without timing."""
    heur = pytest.importorskip("fusepass.kernels.heuristics")
    spec_mod = pytest.importorskip("fusepass.kernels.spec")
    from contextlib import nullcontext

    from fusepass.autotune.cache import TuneCache
    from fusepass.autotune.tuner import Tuner, set_default_tuner

    monkeypatch.setattr(provider, "TIMED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(provider, "device_info", lambda index: ("Fake GPU", (9, 0), None))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launched = []

    def timer(runner):  # runs the real launch once; "time" favours query tiles of 16 with 4 warps, 2 stages
        out = runner()
        cfg = runner.keywords["config"]  # the launcher gets the config as a keyword
        launched.append((cfg, out))
        return 1.0 + abs(cfg.query_tile - 16) + abs(cfg.num_warps - 4) + abs(cfg.num_stages - 2)

    tuner = Tuner(TuneCache(tmp_path), timer)
    set_default_tuner(tuner)
    provider.configure(Options(autotune=True))
    try:
        for direction in ("fwd", "bwd"):
            spec = spec_mod.KernelSpec(head_dim=16, v_head_dim=16, expr="j <= i")
            query = heur.ConfigQuery(direction, spec, torch.float32, 1, 2, 1, 16, 16, torch.device("cpu"))
            cfg = provider.kernel_config_provider(query)
            assert isinstance(cfg, config_type(direction))
            assert cfg.query_tile == 16 and cfg.num_warps == 4 and cfg.num_stages == 2
            assert launched and all(isinstance(out, tuple) for _, out in launched)
            n = len(launched)
            assert provider.kernel_config_provider(query) == cfg and len(launched) == n
        entries = TuneCache(tmp_path).entries()
        assert {k.direction for k in entries} == {"fwd", "bwd"}
        for key, entry in entries.items():
            assert key.gpu == "Fake GPU" and key.features == "expr=j <= i" and key.m_bucket == 16
            assert entry.default_config is not None and entry.candidates >= 2
    finally:
        set_default_tuner(None)
        provider._fast.clear()


def test_the_op_passes_the_autotuner_the_calls_own_arguments(monkeypatch):
    """The op (ops/dispatch, the one wiring point) hands the launchers the autotuner, and the
    query carries the call's mask tensors and predicate (what the tuner needs to time this
    variant); the launchers called alone never reach the tuner."""
    heur = pytest.importorskip("fusepass.kernels.heuristics")
    forward = pytest.importorskip("fusepass.kernels.forward")
    from fusepass.ops.attention import fused_attention

    seen = []

    def recorder(query):
        seen.append(query)
        return None  # the launch then runs the heuristic default

    monkeypatch.setattr(provider, "kernel_config_provider", recorder)
    monkeypatch.setenv("FUSEPASS_INTERPRET", "1")
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    mask = torch.rand(1, 1, 16, 16) < 0.7
    out = fused_attention(q, k, v, masks=[mask], scale=0.25, mask_expr="j <= i")
    (query,) = seen
    assert query.direction == "fwd" and query.call is not None
    assert query.call.masks[0] is mask and query.call.mask_expr == "j <= i" and query.call.scale == 0.25
    assert heur.default_for(query) == heur.default_config(None, torch.float32, 16, "fwd")
    assert torch.isfinite(out).all()
    forward.attention_forward(forward_call(q, k, v, [], [mask], None, 0.25, 0.0, 0.0, float("-inf"), "j <= i", []))
    assert len(seen) == 1


def test_kernels_do_not_import_the_tuner():
    import subprocess
    import sys

    code = ("import sys; import fusepass.kernels.forward, fusepass.kernels.backward; "
            "print(any(m.startswith('fusepass.autotune.provider') or m.startswith('fusepass.autotune.tuner') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_sm90_family_tunes_its_own_space_under_its_own_key(monkeypatch, tmp_path):
    """A query of the Hopper family (ConfigQuery.family="sm90") times that family's candidates
    (kernels/sm90.tuning_space) by launching its kernels (here in the interpreter), and caches
    the winner under a key of its own: the FA2 kernels' entries for the same shape are not its."""
    heur = pytest.importorskip("fusepass.kernels.heuristics")
    sm90 = pytest.importorskip("fusepass.kernels.sm90")
    from contextlib import nullcontext

    from fusepass.autotune.cache import TuneCache
    from fusepass.autotune.tuner import Tuner, set_default_tuner
    from fusepass.call import AttentionCall
    from fusepass.kernels.spec import KernelSpec

    monkeypatch.setattr(provider, "TIMED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(provider, "device_info", lambda index: ("Fake GPU", (9, 0), None))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    timed = []

    def timer(runner):  # launches once; "time" favours 4 warps
        runner()
        cfg = runner.keywords["config"]
        timed.append(cfg)
        return 1.0 + abs(cfg.num_warps - 4) + cfg.BLOCK_N / 1000

    q, k, v = (torch.randn(1, 2, 16, 64, dtype=torch.bfloat16) for _ in range(3))
    call = AttentionCall.build(q, k, v, mask_expr="j <= i")
    tuner = Tuner(TuneCache(tmp_path), timer)
    set_default_tuner(tuner)
    provider.configure(Options(autotune=True))
    try:
        query = heur.ConfigQuery("fwd", KernelSpec.for_call(call), torch.bfloat16, 1, 2, 2, 16, 16,
                                 torch.device("cpu"), call=call, family=sm90.FAMILY)
        cfg = provider.kernel_config_provider(query)
        default, cands = sm90.tuning_space("fwd", call)
        assert set(timed) == set(cands) | {default}
        assert cfg == min(timed, key=lambda c: (abs(c.num_warps - 4), c.BLOCK_N))
        (key,) = TuneCache(tmp_path).entries()
        assert key.features.endswith(",family=sm90") and key.features.startswith("expr=j <= i")
    finally:
        set_default_tuner(None)
        provider._fast.clear()
