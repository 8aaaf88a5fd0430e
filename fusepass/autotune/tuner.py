"""Times candidate configs for a key, once, and remembers the winner in memory and on disk.

``bench_fn(config)`` returns a zero-argument callable that launches the kernel once with
that config on tuning inputs (allocations belong outside the callable).  ``timer(fn)``
returns milliseconds; the default is ``triton.testing.do_bench``'s median.  A candidate whose
compile or launch raises is skipped (logged at DEBUG) — pruning is an estimate, not a proof.

With ``compile_workers`` > 1 every candidate first runs once on that many threads, so that
their compiles (most of a cold key's time: Triton's passes and ptxas, which run without the
GIL) overlap; the timing that follows is one candidate at a time, as it must be.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import threading
import time
from typing import Callable, Sequence

from .cache import MAX_RUNNER_UPS, CacheEntry, TuneCache
from .config import LaunchConfig
from .key import TuneKey

log = logging.getLogger(__name__)

Runner = Callable[[], object]
BenchFn = Callable[[LaunchConfig], Runner]
Timer = Callable[[Runner], float]

# do_bench's warmup/rep are target times in ms.  NOTE: 10/40 keeps one candidate near 0.1 s
# of timing (compile excluded), so a 30-config space costs seconds rather than a minute.
BENCH_WARMUP_MS = 10
BENCH_REP_MS = 40
# A key whose configs take long to compile and time reports how far it is at most this often
# (a cold key can take half a minute: a progress line keeps the first compile from looking hung).
PROGRESS_EVERY_S = 5.0
# One process tunes a key at a time (eight ranks starting together would otherwise time the
# same key eight times over, each slowing the others' timings); the others wait for its entry.
# NOTE: a cold key took ~35 s on the H200 (RESULTS.md); past this a waiter tunes it itself.
CLAIM_TIMEOUT_S = 300.0
CLAIM_DIR = "tuning"


def do_bench_median(fn: Runner) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (it flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))


def announce(message: str, *args: object) -> None:
    """A tuning progress line: logged at INFO, and written to stderr when the process has not
    configured logging at all (no handler anywhere), so that the seconds a first compile spends
    tuning are never silent.  A process that configured logging and filtered INFO out sees
    nothing here."""
    log.info(message, *args)
    if not log.hasHandlers():
        import sys

        print("[fusepass] " + (message % args if args else message), file=sys.stderr, flush=True)


class TuningFailed(RuntimeError):
    """Every candidate failed to compile or run and there was no default to fall back to."""


class Tuner:
    """Remembers winners per key in memory and in a :class:`TuneCache`; tunes a key only when
    neither has it.  Thread-safe: concurrent calls for one key tune it once."""

    def __init__(self, cache: TuneCache | None = None, timer: Timer | None = None, *, persist: bool = True) -> None:
        self.cache = cache if cache is not None else TuneCache()
        self.timer: Timer = timer or do_bench_median
        self.persist = persist
        self._memory: dict[TuneKey, CacheEntry] = {}
        self._failed: set[TuneKey] = set()  # keys where every config failed: not retried here
        self._lock = threading.RLock()
        self.tuned_count = 0  # keys this tuner has timed (not served from a cache)

    def lookup(self, key: TuneKey) -> CacheEntry | None:
        """The remembered entry for ``key``: memory first, then the cache file."""
        entry = self._memory.get(key)
        if entry is None:
            entry = self.cache.get(key)
            if entry is not None:
                log.debug("fusepass autotune: cache hit for %s: %s", key.describe(), entry.config.short())
                self._memory[key] = entry
        return entry

    def tune(
        self,
        key: TuneKey,
        candidates: Sequence[LaunchConfig],
        bench_fn: BenchFn,
        *,
        default: LaunchConfig | None = None,
        shape: tuple[tuple[str, int], ...] = (),
        flops: float | None = None,
        progress: tuple[int, int] | None = None,
        compile_workers: int = 0,
        worker_setup: Callable[[], object] | None = None,
    ) -> LaunchConfig:
        """The best config for ``key``, timing ``candidates`` (and ``default``) unless known.
        ``compile_workers`` > 1: first runs on threads (module docstring), each thread running
        ``worker_setup`` first (the device to launch on is per thread)."""
        with self._lock:
            entry = self.lookup(key)
            if entry is not None:
                return entry.config
            if key in self._failed and default is not None:
                return default
            with self._claim(key):  # the entry is written before another process may look
                entry = self.lookup(key)  # tuned by another process while this one waited
                if entry is not None:
                    return entry.config
                entry = self._time(key, candidates, bench_fn, default, shape, flops, progress,
                                   compile_workers, worker_setup)
                if entry is None:
                    assert default is not None
                    self._failed.add(key)
                    return default
                self._memory[key] = entry
                if self.persist:
                    self.cache.put(key, entry)
            return entry.config

    @contextlib.contextmanager
    def _claim(self, key: TuneKey):
        """Hold ``key``'s tuning lock (a file beside the cache, so every process sharing the cache
        sees it) while this process tunes it.  Without a persisted cache, or where the lock file
        cannot be made, or after CLAIM_TIMEOUT_S of waiting, tune without it."""
        if not self.persist:
            yield
            return
        import filelock

        name = hashlib.sha256(key.to_string().encode()).hexdigest()[:20] + ".lock"
        try:
            directory = self.cache.directory / CLAIM_DIR
            directory.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(directory / name))
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                announce("fusepass autotune: waiting for another process tuning %s", key.describe())
                lock.acquire(timeout=CLAIM_TIMEOUT_S)
        except filelock.Timeout:
            log.warning("fusepass autotune: %s stayed claimed for %.0f s; tuning it here as well", key.describe(),
                        CLAIM_TIMEOUT_S)
            yield
            return
        except OSError as e:
            log.debug("fusepass autotune: no tuning lock for %s (%s)", key.describe(), e)
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def _time(self, key, candidates, bench_fn, default, shape, flops, progress, compile_workers=0,
              worker_setup=None) -> CacheEntry | None:
        order = list(candidates)
        if default is not None and default not in order:
            order.insert(0, default)
        count = progress or (self.tuned_count + 1, 0)
        label = f"{count[0]}/{count[1]}" if count[1] else f"#{count[0]}"
        announce("fusepass autotune: tuning %s %s over %d configs ...", label, key.describe(), len(order))
        start = time.perf_counter()
        runners = _first_runs(order, bench_fn, compile_workers, worker_setup)
        if runners is not None:
            announce("fusepass autotune: %s compiled %d configs on %d threads in %.1f s", label, len(order),
                     min(compile_workers, len(order)), time.perf_counter() - start)
        timings: list[tuple[LaunchConfig, float]] = []
        reported = start
        for n, cfg in enumerate(order):
            if n and time.perf_counter() - reported >= PROGRESS_EVERY_S:
                reported = time.perf_counter()
                best = min(timings, key=lambda t: t[1], default=None)
                announce("fusepass autotune: %s at %d/%d configs after %.1f s%s", label, n, len(order),
                         reported - start, f", best so far {best[0].short()} {best[1]:.3f} ms" if best else "")
            try:
                runner = runners[n] if runners is not None else bench_fn(cfg)
                if isinstance(runner, BaseException):
                    raise runner
                ms = float(self.timer(runner))
            except Exception as e:  # noqa: BLE001 - a config that does not compile or run is skipped
                log.debug("fusepass autotune: %s failed for %s: %s: %s", cfg.short(), key.describe(), type(e).__name__, e)
                continue
            if not math.isfinite(ms) or ms <= 0:
                log.debug("fusepass autotune: %s gave a bad time %r for %s", cfg.short(), ms, key.describe())
                continue
            timings.append((cfg, ms))
        elapsed = time.perf_counter() - start
        self.tuned_count += 1
        if not timings:
            if default is None:
                raise TuningFailed(f"fusepass autotune: every one of {len(order)} configs failed for {key.describe()}")
            log.warning("fusepass autotune: every config failed for %s; using the default %s (not cached)",
                        key.describe(), default.short())
            return None
        ranked = sorted(timings, key=lambda t: t[1])  # stable: earlier candidates win ties
        best, best_ms = ranked[0]
        default_ms = next((ms for cfg, ms in timings if cfg == default), None)
        entry = CacheEntry(
            config=best,
            time_ms=best_ms,
            runner_up=tuple(ranked[1 : 1 + MAX_RUNNER_UPS]),
            tuned_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            tuning_seconds=round(elapsed, 3),
            shape=tuple(shape),
            tflops=(flops / (best_ms * 1e-3) / 1e12) if flops else None,
            default_config=default,
            default_ms=default_ms,
            candidates=len(timings),
        )
        vs_default = (
            f", default {default.short()} {default_ms:.3f} ms ({default_ms / best_ms:.2f}x)"
            if default is not None and default_ms is not None else ""
        )
        announce("fusepass autotune: tuned %s %s in %.1f s: %s %.3f ms%s, %d/%d configs ran",
                 label, key.describe(), elapsed, best.short(), best_ms, vs_default, len(timings), len(order))
        return entry

    def forget_memory(self) -> None:
        """Drop the in-memory entries (the cache file stays)."""
        with self._lock:
            self._memory.clear()
            self._failed.clear()


def _first_runs(order: Sequence[LaunchConfig], bench_fn: BenchFn, workers: int,
                worker_setup: Callable[[], object] | None) -> list | None:
    """Each candidate's runner (or the exception that making or first running it raised), run
    once on ``workers`` threads; None when fewer than two workers or candidates (no overlap to
    gain).  The runners are made on this thread: a bench_fn may build its inputs on first use."""
    if workers <= 1 or len(order) <= 1:
        return None
    from concurrent.futures import ThreadPoolExecutor

    runners: list = []
    for cfg in order:
        try:
            runners.append(bench_fn(cfg))
        except Exception as e:  # noqa: BLE001 - reported when the candidate's turn to be timed comes
            runners.append(e)

    def first_run(runner):
        if isinstance(runner, BaseException):
            return runner
        try:
            runner()
        except Exception as e:  # noqa: BLE001 - as above
            return e
        return runner

    with ThreadPoolExecutor(max_workers=min(workers, len(order)), initializer=worker_setup) as pool:
        return list(pool.map(first_run, runners))


_default_tuner: Tuner | None = None
_default_lock = threading.Lock()


def default_tuner() -> Tuner:
    """The process-wide tuner on the default cache directory (created on first use)."""
    global _default_tuner
    with _default_lock:
        if _default_tuner is None:
            _default_tuner = Tuner()
        return _default_tuner


def set_default_tuner(tuner: Tuner | None) -> None:
    """Replace the process-wide tuner (tests; a custom cache directory or timer)."""
    global _default_tuner
    with _default_lock:
        _default_tuner = tuner


def tune(
    key: TuneKey,
    candidates: Sequence[LaunchConfig],
    bench_fn: BenchFn,
    timer: Timer | None = None,
    *,
    default: LaunchConfig | None = None,
    shape: tuple[tuple[str, int], ...] = (),
    flops: float | None = None,
    cache: TuneCache | None = None,
) -> LaunchConfig:
    """Best config for ``key`` through the process-wide tuner (or a tuner on ``cache``/``timer``
    when given; memory is then per call, the file still dedupes across calls)."""
    tuner = default_tuner() if timer is None and cache is None else Tuner(cache, timer)
    return tuner.tune(key, candidates, bench_fn, default=default, shape=shape, flops=flops)
