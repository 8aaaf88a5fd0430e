"""Inductor's on-disk caches key a fusepass graph by fusepass's source (fusepass/compile_cache.py):
a graph cached by another fusepass (whose op may lay its output out otherwise) is compiled
anew, not reused; the same fusepass reuses it."""

from __future__ import annotations

import math

import torch
from torch._dynamo.utils import counters

import fusepass  # noqa: F401  (registers the backend)
from fusepass import compile_cache


def attention(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def _compile_once(q):
    torch._dynamo.reset()
    torch.compile(attention, backend="fusepass")(q, q, q)


def test_a_graph_cached_by_other_fusepass_source_is_compiled_anew(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", True)
    monkeypatch.setattr(inductor_config, "force_disable_caches", False)
    q = torch.randn(1, 2, 16, 8)
    hits = lambda: counters["inductor"]["fxgraph_cache_hit"]  # noqa: E731
    _compile_once(q)
    before = hits()
    _compile_once(q)
    assert hits() == before + 1  # the same source: the cached graph is reused
    monkeypatch.setattr(compile_cache, "source_hash", lambda: "another-fusepass")
    _compile_once(q)
    assert hits() == before + 1  # another source: compiled anew


def test_a_user_s_own_pre_pass_keeps_its_slot(monkeypatch):
    import torch._inductor.config as inductor_config

    mine = object()
    monkeypatch.setattr(inductor_config, "post_grad_custom_pre_pass", mine)
    assert compile_cache.config_patches({"a": 1}) == {"a": 1}
    monkeypatch.setattr(inductor_config, "post_grad_custom_pre_pass", None)
    patched = compile_cache.config_patches({"a": 1})
    assert patched["post_grad_custom_pre_pass"].uuid() == "fusepass-" + compile_cache.source_hash()
