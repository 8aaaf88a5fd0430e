"""Builders shared by the autotune and CLI tests (keys, entries, a fake timer)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from fusepass.autotune.cache import CacheEntry
from fusepass.autotune.config import ForwardConfig
from fusepass.autotune.key import TuneKey


def make_key(**overrides: Any) -> TuneKey:
    fields: dict[str, Any] = dict(
        gpu="NVIDIA H200", capability=(9, 0), template_hash="tpl0", dtype="bf16", head_dim=128,
        seq_q=1000, seq_k=1000, direction="fwd", features="causal", gqa_group=1,
    )
    fields.update(overrides)
    return TuneKey.build(**fields)


def make_entry(ms: float = 0.5, cfg: ForwardConfig | None = None, **overrides: Any) -> CacheEntry:
    cfg = cfg or ForwardConfig(128, 64, 8, 3)
    base = CacheEntry(
        config=cfg, time_ms=ms, runner_up=((ForwardConfig(64, 64, 4, 2), ms * 1.5),),
        tuned_at="2026-11-21T06:00:00+00:00", tuning_seconds=2.5,
        shape=(("B", 4), ("Hq", 16), ("Hkv", 16), ("M", 1000), ("N", 1000), ("D", 128), ("Dv", 128)),
        tflops=123.4, default_config=ForwardConfig(64, 64, 4, 2), default_ms=ms * 1.5, candidates=7,
    )
    return dataclasses.replace(base, **overrides)


class FakeTimer:
    """Times a runner by looking its config up in ``times``; counts what it timed.
    ``bench_fn`` makes runners that record each launch."""

    def __init__(self, times: dict[ForwardConfig, float], fail: frozenset = frozenset()) -> None:
        self.times = times
        self.fail = fail
        self.timed: list[ForwardConfig] = []
        self.launched: list[ForwardConfig] = []

    def _launch(self, cfg: ForwardConfig) -> None:
        if cfg in self.fail:
            raise RuntimeError(f"out of resources: {cfg}")
        self.launched.append(cfg)

    def bench_fn(self, cfg: ForwardConfig):
        return functools.partial(self._launch, cfg)

    def __call__(self, runner) -> float:
        runner()  # a failing config raises here, as do_bench would
        cfg = runner.args[0]
        self.timed.append(cfg)
        return self.times[cfg]
