"""The tuner with a fake timer: picks the fastest, never retunes, survives failing configs."""

from __future__ import annotations

import logging
import random

import pytest

from autotune_util import FakeTimer, make_key
from fusepass.autotune import tuner as tuner_mod
from fusepass.autotune.cache import TuneCache
from fusepass.autotune.config import ForwardConfig, arch_for
from fusepass.autotune.space import candidates
from fusepass.autotune.tuner import Tuner, TuningFailed

CANDS = candidates(arch_for((9, 0)), 128, "bf16", m_bucket=1024, n_bucket=1024)


def random_times(seed: int) -> dict[ForwardConfig, float]:
    rng = random.Random(seed)
    return {c: rng.uniform(0.1, 2.0) for c in CANDS}


@pytest.mark.parametrize("seed", range(5))
def test_picks_the_fastest_and_records_runner_ups(tmp_path, seed):
    times = random_times(seed)
    timer = FakeTimer(times)
    tuner = Tuner(TuneCache(tmp_path), timer)
    best = tuner.tune(make_key(), CANDS, timer.bench_fn, shape=(("M", 1000),), flops=1e12)
    assert best == min(times, key=times.get)
    entry = tuner.cache.get(make_key())
    assert entry.config == best and entry.time_ms == times[best]
    ups = [ms for _, ms in entry.runner_up]
    assert ups == sorted(times.values())[1 : 1 + len(ups)] and ups
    assert entry.tflops == pytest.approx(1e12 / (times[best] * 1e-3) / 1e12)
    assert entry.candidates == len(CANDS) and entry.shape == (("M", 1000),)


def test_runs_once_per_key_in_memory_and_across_tuners(tmp_path):
    timer = FakeTimer(random_times(7))
    tuner = Tuner(TuneCache(tmp_path), timer)
    first = tuner.tune(make_key(), CANDS, timer.bench_fn)
    n = len(timer.timed)
    assert n == len(CANDS)
    assert tuner.tune(make_key(seq_q=600, seq_k=900), CANDS, timer.bench_fn) == first  # same bucket
    assert len(timer.timed) == n
    other = Tuner(TuneCache(tmp_path), timer)  # a new process: the disk cache answers
    assert other.tune(make_key(), CANDS, timer.bench_fn) == first
    assert len(timer.timed) == n
    other.tune(make_key(direction="bwd"), CANDS, timer.bench_fn)  # backward is its own key
    assert len(timer.timed) == 2 * n


def test_default_is_always_timed_and_recorded(tmp_path):
    times = random_times(3)
    default = ForwardConfig(32, 32, 2, 1)  # not in the space
    times[default] = 5.0
    timer = FakeTimer(times)
    tuner = Tuner(TuneCache(tmp_path), timer)
    tuner.tune(make_key(), CANDS, timer.bench_fn, default=default)
    entry = tuner.cache.get(make_key())
    assert timer.timed[0] == default
    assert entry.default_config == default and entry.default_ms == 5.0
    assert entry.speedup_over_default == pytest.approx(5.0 / min(times.values()))


def test_ties_go_to_the_earlier_candidate(tmp_path):
    timer = FakeTimer({c: 1.0 for c in CANDS})
    assert Tuner(TuneCache(tmp_path), timer).tune(make_key(), CANDS, timer.bench_fn) == CANDS[0]


def test_failing_configs_are_skipped(tmp_path):
    times = random_times(11)
    fastest = min(times, key=times.get)
    timer = FakeTimer(times, fail=frozenset({fastest}))
    best = Tuner(TuneCache(tmp_path), timer).tune(make_key(), CANDS, timer.bench_fn)
    rest = {c: t for c, t in times.items() if c != fastest}
    assert best == min(rest, key=rest.get)


def test_everything_failing_falls_back_to_default_uncached(tmp_path, caplog):
    timer = FakeTimer(random_times(1), fail=frozenset(CANDS))
    tuner = Tuner(TuneCache(tmp_path), timer)
    default = CANDS[0]
    with caplog.at_level(logging.WARNING):
        assert tuner.tune(make_key(), CANDS, timer.bench_fn, default=default) == default
    assert "every config failed" in caplog.text
    assert tuner.cache.get(make_key()) is None
    assert tuner.tune(make_key(), CANDS, timer.bench_fn, default=default) == default
    assert tuner.tuned_count == 1, "a key that failed must not be retried in the same process"
    with pytest.raises(TuningFailed):
        Tuner(TuneCache(tmp_path / "x"), timer).tune(make_key(), CANDS, timer.bench_fn)


def test_bad_timings_are_ignored(tmp_path):
    times = random_times(2)
    times[CANDS[0]] = float("nan")
    times[CANDS[1]] = 0.0
    timer = FakeTimer(times)
    best = Tuner(TuneCache(tmp_path), timer).tune(make_key(), CANDS, timer.bench_fn)
    assert best not in (CANDS[0], CANDS[1])


def test_tuning_logs_a_line_per_new_key(tmp_path, caplog):
    timer = FakeTimer(random_times(4))
    tuner = Tuner(TuneCache(tmp_path), timer)
    tuner.tune(make_key(seq_q=64), CANDS, timer.bench_fn)  # already known: not tuned again
    keys = [make_key(seq_q=64), make_key(seq_q=256), make_key(seq_q=256), make_key(seq_q=4096), make_key(direction="bwd")]
    with caplog.at_level(logging.INFO, logger="fusepass.autotune.tuner"):
        got = [tuner.tune(k, CANDS, timer.bench_fn) for k in keys]
    assert got[1] == got[2] and len(got) == len(keys)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("fusepass autotune: tuning #" in m for m in lines) == 3, lines
    tuned = [m for m in lines if m.startswith("fusepass autotune: tuned")]
    assert len(tuned) == 3 and all(" s: " in m and " ms" in m for m in tuned)


def test_a_long_key_reports_progress_while_it_tunes(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tuner_mod, "PROGRESS_EVERY_S", 0.0)  # every config is "long"
    times = random_times(4)
    timer = FakeTimer(times)
    with caplog.at_level(logging.INFO, logger="fusepass.autotune.tuner"):
        Tuner(TuneCache(tmp_path), timer).tune(make_key(), CANDS, timer.bench_fn)
    progress = [r.getMessage() for r in caplog.records if " configs after " in r.getMessage()]
    assert len(progress) == len(CANDS) - 1, progress  # before each config but the first
    assert progress[0].startswith("fusepass autotune: #1 at 1/") and "best so far" in progress[0]


def test_module_level_tune_uses_the_given_timer_and_cache(tmp_path):
    times = random_times(9)
    timer = FakeTimer(times)
    cache = TuneCache(tmp_path)
    assert tuner_mod.tune(make_key(), CANDS, timer.bench_fn, timer=timer, cache=cache) == min(times, key=times.get)
    n = len(timer.timed)
    tuner_mod.tune(make_key(), CANDS, timer.bench_fn, timer=timer, cache=cache)
    assert len(timer.timed) == n


def _tune_in_a_process(rank: int, directory: str, log_dir: str, start_file: str) -> None:
    """One of several processes sharing a cache: tune one key with a slow fake timer, noting
    each config it times and the winner in files of its own."""
    import os
    import time

    from autotune_util import FakeTimer, make_key
    from fusepass.autotune.cache import TuneCache
    from fusepass.autotune.tuner import Tuner

    times = random_times(11)

    class Slow(FakeTimer):
        def __call__(self, runner) -> float:
            time.sleep(0.01)
            ms = super().__call__(runner)
            with open(os.path.join(log_dir, f"timed.{rank}"), "a") as f:
                f.write(self.timed[-1].short() + "\n")
            return ms

    while not os.path.exists(start_file):  # start together
        time.sleep(0.01)
    timer = Slow(times)
    best = Tuner(TuneCache(directory), timer).tune(make_key(), CANDS, timer.bench_fn)
    with open(os.path.join(log_dir, f"best.{rank}"), "w") as f:
        f.write(best.short())


def test_processes_sharing_a_cache_tune_a_key_once(tmp_path):
    """Ranks that start together on one cache: one times the key's configs, the others wait
    for its entry (the tuning lock beside the cache) and read it."""
    import multiprocessing as mp
    import os

    cache_dir, log_dir, start = tmp_path / "cache", tmp_path / "log", tmp_path / "go"
    log_dir.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_tune_in_a_process, args=(r, str(cache_dir), str(log_dir), str(start)))
             for r in range(3)]
    for p in procs:
        p.start()
    start.touch()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"a tuning process exited with {p.exitcode}"
    timed = {name: (log_dir / name).read_text().splitlines() for name in os.listdir(log_dir) if name.startswith("timed.")}
    assert len(timed) == 1 and len(next(iter(timed.values()))) == len(CANDS), {k: len(v) for k, v in timed.items()}
    best = {(log_dir / f"best.{r}").read_text() for r in range(3)}
    times = random_times(11)
    assert best == {min(times, key=times.get).short()}


def test_candidates_first_run_on_threads_then_time_one_at_a_time(tmp_path):
    import threading

    times = random_times(11)
    fail = frozenset(list(CANDS)[2:4])
    timer = FakeTimer(times, fail=fail)
    threads, setups = set(), []
    launch = timer._launch

    def recording_launch(cfg):
        threads.add(threading.get_ident())
        launch(cfg)

    timer._launch = recording_launch
    tuner = Tuner(TuneCache(tmp_path), timer)
    best = tuner.tune(make_key(), CANDS, timer.bench_fn, compile_workers=4,
                      worker_setup=lambda: setups.append(threading.get_ident()))
    ok = [c for c in CANDS if c not in fail]
    assert best == min(ok, key=times.get)  # what one-at-a-time tuning picks
    workers = threads - {threading.get_ident()}
    assert workers and workers <= set(setups)  # first runs on workers, each set up first
    # Every candidate ran once first (the failing ones raised there), then each working one
    # was timed; the failing ones were not timed.
    assert sorted(map(str, timer.launched[: len(ok)])) == sorted(map(str, ok))
    assert sorted(map(str, timer.timed)) == sorted(map(str, ok))
    assert tuner.cache.get(make_key()).candidates == len(ok)
