"""The persistent autotune cache: one JSON file per cache directory.

Layout of ``<cache dir>/autotune.json``::

    {"format": "fusepass-autotune", "version": 1,
     "entries": {"<TuneKey.to_string()>": {"config": {...}, "time_ms": 0.41, ...}, ...}}

Concurrency: readers never lock (every write replaces the file atomically, so a reader sees
the old or the new file, never half of one).  Writers take ``autotune.json.lock`` (filelock),
re-read the file, merge their entries into it and replace it through a temporary file in the
same directory (``os.replace``), so any number of processes tuning at once lose nothing.

A file that cannot be parsed is reported once per process (a warning), kept beside the cache
as ``autotune.json.corrupt`` and rebuilt from the next write.  Entries that do not parse
(e.g. written by a newer fusepass) are kept in the file untouched but never used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from fusepass.cache_dir import cache_root

from .config import LaunchConfig, config_from_dict
from .key import TuneKey

log = logging.getLogger(__name__)

FILE_NAME = "autotune.json"
FILE_FORMAT = "fusepass-autotune"
# 2: backward configs name their tiles (BLOCK_OWN, BLOCK_STEP); version 1 files are migrated.
FILE_VERSION = 2
# How long a writer waits for another process's write before giving up on persisting.
# NOTE: a write holds the lock for milliseconds; a minute means something is stuck.
LOCK_TIMEOUT_S = 60.0
# How many runner-up timings an entry keeps (enough to see how close the race was).
MAX_RUNNER_UPS = 5

_reported: set[tuple[str, str]] = set()


def _report_once(path: Path, kind: str, message: str, *args: Any) -> None:
    if (str(path), kind) in _reported:
        log.debug(message, *args)
        return
    _reported.add((str(path), kind))
    log.warning(message, *args)


def default_cache_dir() -> Path:
    """Where tuned configs live by default: the one cache root (``fusepass.cache_dir``)."""
    return cache_root()


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    config: LaunchConfig  # the winner
    time_ms: float  # its median time
    runner_up: tuple[tuple[LaunchConfig, float], ...]  # next best (config, ms), fastest first
    tuned_at: str  # ISO-8601 UTC time of tuning
    tuning_seconds: float  # wall time spent tuning this key (compiles included)
    shape: tuple[tuple[str, int], ...] = ()  # the shape it was tuned on: (("B", 4), ("Hq", 16), ...)
    tflops: float | None = None  # achieved TFLOP/s of the winner at that shape, when FLOPs were given
    default_config: LaunchConfig | None = None  # the heuristic default, when it was timed too
    default_ms: float | None = None
    candidates: int = 0  # how many configs were timed successfully

    @property
    def speedup_over_default(self) -> float | None:
        if not self.default_ms or not self.time_ms:
            return None
        return self.default_ms / self.time_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.as_dict(),
            "time_ms": self.time_ms,
            "runner_up": [[c.as_dict(), ms] for c, ms in self.runner_up],
            "tuned_at": self.tuned_at,
            "tuning_seconds": self.tuning_seconds,
            "shape": dict(self.shape),
            "tflops": self.tflops,
            "default_config": self.default_config.as_dict() if self.default_config else None,
            "default_ms": self.default_ms,
            "candidates": self.candidates,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CacheEntry":
        """ValueError/TypeError/KeyError on a malformed entry."""
        default = data.get("default_config")
        return cls(
            config=config_from_dict(data["config"]),
            time_ms=float(data["time_ms"]),
            runner_up=tuple((config_from_dict(c), float(ms)) for c, ms in data.get("runner_up", ())),
            tuned_at=str(data["tuned_at"]),
            tuning_seconds=float(data.get("tuning_seconds", 0.0)),
            shape=tuple((str(k), int(v)) for k, v in dict(data.get("shape") or {}).items()),
            tflops=None if data.get("tflops") is None else float(data["tflops"]),
            default_config=config_from_dict(default) if default else None,
            default_ms=None if data.get("default_ms") is None else float(data["default_ms"]),
            candidates=int(data.get("candidates", 0)),
        )


class CacheFileError(Exception):
    """The cache (or an import) file is unreadable or not a fusepass autotune file."""


def parse_document(text: str, source: str) -> dict[str, dict[str, Any]]:
    """The raw entries of a cache document; CacheFileError if it is not one."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CacheFileError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise CacheFileError(f"{source} is not a fusepass autotune cache (no format tag {FILE_FORMAT!r})")
    if doc.get("version") not in (1, FILE_VERSION):
        raise CacheFileError(f"{source} has cache file version {doc.get('version')!r}, this fusepass reads {FILE_VERSION}")
    entries = doc.get("entries")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise CacheFileError(f"{source}: 'entries' is not an object of objects")
    if doc["version"] == 1:
        entries = {k: _from_version_1(k, v) for k, v in entries.items()}
    return entries


def _from_version_1(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A version 1 entry: one config type for both directions (a backward's BLOCK_N was the tile
    a program owns, BLOCK_M its step) and an unused warp_specialize knob."""
    backward = ";dir=bwd;" in key + ";"

    def config(c):
        if not isinstance(c, dict):
            return c
        c = {n: v for n, v in c.items() if n != "warp_specialize"}
        if backward and "BLOCK_M" in c and "BLOCK_N" in c:
            c["BLOCK_OWN"], c["BLOCK_STEP"] = c.pop("BLOCK_N"), c.pop("BLOCK_M")
        return c

    out = dict(entry)
    out["config"] = config(entry.get("config"))
    if entry.get("default_config"):
        out["default_config"] = config(entry["default_config"])
    out["runner_up"] = [[config(c), ms] for c, ms in entry.get("runner_up", ())]
    return out


def render_document(entries: Mapping[str, Mapping[str, Any]]) -> str:
    doc = {"format": FILE_FORMAT, "version": FILE_VERSION, "entries": dict(sorted(entries.items()))}
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def parse_entries(raw: Mapping[str, Mapping[str, Any]]) -> tuple[dict[TuneKey, CacheEntry], list[str]]:
    """Parsed entries and the raw keys that did not parse (kept in the file, never used)."""
    good: dict[TuneKey, CacheEntry] = {}
    bad: list[str] = []
    for text, data in raw.items():
        try:
            good[TuneKey.from_string(text)] = CacheEntry.from_json(data)
        except (ValueError, TypeError, KeyError) as e:
            log.debug("fusepass autotune cache: skipping unreadable entry %r: %s", text, e)
            bad.append(text)
    return good, bad


class TuneCache:
    """The cache file of one directory (``default_cache_dir()`` when none is given)."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.path = self.directory / FILE_NAME
        self.lock_path = self.directory / (FILE_NAME + ".lock")
        self._memo: tuple[tuple[int, int, int], dict[str, dict[str, Any]]] | None = None

    def __repr__(self) -> str:
        return f"TuneCache({str(self.directory)!r})"

    # -- reading -----------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.is_file()

    def read_raw(self, *, strict: bool = False) -> dict[str, dict[str, Any]]:
        """Raw entries of the file ({} when there is none).  A corrupt or unreadable file is
        reported once and read as empty; with ``strict`` it raises CacheFileError instead."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        except OSError as e:
            return self._unreadable(f"cannot stat {self.path}: {e}", strict)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._memo is not None and self._memo[0] == stamp:
            return dict(self._memo[1])
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            return self._unreadable(f"cannot read {self.path}: {e}", strict)
        try:
            raw = parse_document(text, str(self.path))
        except CacheFileError as e:
            return self._unreadable(str(e), strict)
        self._memo = (stamp, raw)
        return dict(raw)

    def _unreadable(self, why: str, strict: bool) -> dict[str, dict[str, Any]]:
        if strict:
            raise CacheFileError(why)
        _report_once(self.path, "corrupt", "fusepass autotune cache: %s; ignoring it (it is rebuilt on the next write)", why)
        return {}

    def entries(self) -> dict[TuneKey, CacheEntry]:
        """Every readable entry, current or stale."""
        return parse_entries(self.read_raw())[0]

    def get(self, key: TuneKey) -> CacheEntry | None:
        """The entry for ``key``.  The key holds the versions and template hash, so an entry
        from another build has another key and is never returned for a current one."""
        data = self.read_raw().get(key.to_string())
        if data is None:
            return None
        try:
            return CacheEntry.from_json(data)
        except (ValueError, TypeError, KeyError) as e:
            log.debug("fusepass autotune cache: unreadable entry for %s: %s", key.describe(), e)
            return None

    # -- writing -----------------------------------------------------------------------------

    def put(self, key: TuneKey, entry: CacheEntry) -> bool:
        return self.update({key.to_string(): entry.to_json()})

    def update(
        self,
        add: Mapping[str, Mapping[str, Any]] | None = None,
        remove: Callable[[str, Mapping[str, Any]], bool] | None = None,
    ) -> bool:
        """Read-merge-write under the lock: add (or replace) raw entries, drop those ``remove``
        says yes to.  False (and a warning, once) when the cache cannot be written."""
        import filelock

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with filelock.FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S):
                raw = self._read_for_write()
                if remove is not None:
                    raw = {k: v for k, v in raw.items() if not remove(k, v)}
                raw.update({k: dict(v) for k, v in (add or {}).items()})
                self._write_atomic(render_document(raw))
            return True
        except filelock.Timeout:
            _report_once(self.path, "lock", "fusepass autotune cache: %s stayed locked for %.0f s; "
                         "results of this process are not persisted", self.lock_path, LOCK_TIMEOUT_S)
        except OSError as e:
            _report_once(self.path, "write", "fusepass autotune cache: cannot write %s (%s); "
                         "results of this process are not persisted", self.path, e)
        return False

    def _read_for_write(self) -> dict[str, dict[str, Any]]:
        try:
            return self.read_raw(strict=True)
        except CacheFileError as e:
            _report_once(self.path, "corrupt", "fusepass autotune cache: %s; rebuilding it "
                         "(the old file is kept as %s.corrupt)", e, self.path.name)
            try:
                os.replace(self.path, self.path.with_name(self.path.name + ".corrupt"))
            except OSError:
                pass
            return {}

    def _write_atomic(self, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._memo = None

    def remove(self, predicate: Callable[[str, Mapping[str, Any]], bool]) -> int:
        """Drop the entries ``predicate(key_string, raw_entry)`` selects; how many went."""
        doomed = [k for k, v in self.read_raw(strict=True).items() if predicate(k, v)]
        if doomed and not self.update(remove=predicate):
            raise CacheFileError(f"cannot write {self.path}")
        return len(doomed)

    def clear(self) -> int:
        return self.remove(lambda k, v: True)

    # -- moving between machines -------------------------------------------------------------

    def export_to(self, destination: str | os.PathLike, keys: Iterable[str] | None = None) -> int:
        """Write the entries (all, or those of ``keys``) to a file in the cache's own format."""
        raw = self.read_raw(strict=True)
        if keys is not None:
            wanted = set(keys)
            raw = {k: v for k, v in raw.items() if k in wanted}
        dest = Path(destination)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(render_document(raw), encoding="utf-8")
        os.replace(tmp, dest)
        return len(raw)

    def import_from(self, source: str | os.PathLike) -> tuple[int, int]:
        """Merge a file written by :meth:`export_to` (or another cache file) into this cache;
        imported entries win over existing ones with the same key.  (added, replaced)."""
        src = Path(source)
        try:
            text = src.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CacheFileError(f"cannot read {src}: {e}") from None
        incoming = parse_document(text, str(src))
        good, bad = parse_entries(incoming)
        if bad:
            raise CacheFileError(f"{src}: {len(bad)} entries are not readable tune entries, e.g. {bad[0]!r}")
        existing = self.read_raw()
        replaced = sum(1 for k in incoming if k in existing)
        if not self.update(add=incoming):
            raise CacheFileError(f"cannot write {self.path}")
        return len(incoming) - replaced, replaced


def stale_reasons(entries: Mapping[TuneKey, CacheEntry]) -> dict[TuneKey, str]:
    """Why each entry would not be used by this process ("" = it would be).

    An entry is stale when its torch or triton version differs from this process's, or when
    another entry for the same problem (same key except versions and template hash) with the
    current versions was tuned later under a different template hash: the template changed
    since.  The running kernel's template hash itself is only known to the kernels, so this is
    the best the CLI can tell without importing them; lookups never use a stale entry anyway,
    because the versions and template hash are part of the key.
    """
    from .key import current_versions

    torch_now, triton_now = current_versions()
    newest: dict[tuple, tuple[str, str]] = {}  # problem -> (tuned_at, template_hash) among current-version entries
    for key, entry in entries.items():
        if key.torch_version == torch_now and key.triton_version == triton_now:
            problem = key.without_build()
            if problem not in newest or entry.tuned_at > newest[problem][0]:
                newest[problem] = (entry.tuned_at, key.template_hash)
    reasons: dict[TuneKey, str] = {}
    for key in entries:
        if key.torch_version != torch_now:
            reasons[key] = f"torch {key.torch_version} (now {torch_now})"
        elif key.triton_version != triton_now:
            reasons[key] = f"triton {key.triton_version} (now {triton_now})"
        elif newest[key.without_build()][1] != key.template_hash:
            reasons[key] = "template changed since"
        else:
            reasons[key] = ""
    return reasons
