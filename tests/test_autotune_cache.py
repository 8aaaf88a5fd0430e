"""The persistent cache: round trips, other processes, concurrent writers, corruption, staleness."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autotune_util import make_entry, make_key
from fusepass.autotune import cache as cache_mod
from fusepass.autotune.cache import CacheFileError, TuneCache, default_cache_dir, stale_reasons
from fusepass.autotune.config import ForwardConfig

REPO = Path(__file__).resolve().parents[1]
# Makes ``fusepass`` importable without running fusepass/__init__.py (which imports torch and the
# backend: seconds per process); the cache modules need neither.
LIGHT_PACKAGE = textwrap.dedent(f"""
    import sys, types
    _pkg = types.ModuleType("fusepass"); _pkg.__path__ = [{str(REPO / 'fusepass')!r}]
    sys.modules["fusepass"] = _pkg
""")


@pytest.fixture(autouse=True)
def _fresh_reports():
    cache_mod._reported.clear()
    yield
    cache_mod._reported.clear()


def test_default_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FUSEPASS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "xdg" / "fusepass"
    assert TuneCache().path.parent == default_cache_dir()


def test_kernels_and_tuned_configs_share_one_cache_root(monkeypatch, tmp_path):
    render = pytest.importorskip("fusepass.kernels.render")
    monkeypatch.delenv("FUSEPASS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert render.cache_dir() == default_cache_dir() / "kernels"
    monkeypatch.setenv("FUSEPASS_CACHE_DIR", str(tmp_path / "a"))
    assert render.cache_dir() == tmp_path / "a" / "kernels" and default_cache_dir() == tmp_path / "a"


def test_put_get_round_trip(tmp_path):
    cache = TuneCache(tmp_path)
    key, entry = make_key(), make_entry(0.25)
    assert cache.get(key) is None and not cache.exists()
    assert cache.put(key, entry)
    assert cache.get(key) == entry
    assert TuneCache(tmp_path).get(key) == entry  # a fresh object reads the file
    assert cache.get(make_key(direction="bwd")) is None
    doc = json.loads(cache.path.read_text())
    assert doc["format"] == "fusepass-autotune" and list(doc["entries"]) == [key.to_string()]
    assert not list(tmp_path.glob("*.tmp")), "temporary files must not be left behind"


def test_other_process_reads_and_writes(tmp_path):
    cache = TuneCache(tmp_path)
    mine, theirs = make_key(seq_q=100), make_key(seq_q=5000)
    cache.put(mine, make_entry(0.125))
    script = LIGHT_PACKAGE + textwrap.dedent(f"""
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from autotune_util import make_entry, make_key
        from fusepass.autotune.cache import TuneCache
        cache = TuneCache({str(tmp_path)!r})
        got = cache.get(make_key(seq_q=100))
        assert got is not None and got.time_ms == 0.125, got
        cache.put(make_key(seq_q=5000), make_entry(0.75))
        assert "torch" not in sys.modules, "the cache must not need torch"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)
    assert cache.get(theirs).time_ms == 0.75
    assert cache.get(mine).time_ms == 0.125


def _writer(directory: str, rank: int, count: int) -> None:
    cache = TuneCache(directory)
    for i in range(count):
        cache.put(make_key(seq_q=16 << (i % 10), head_dim=8 * (rank + 1), gqa_group=i + 1), make_entry(rank + i / 100))


def test_many_processes_writing_at_once_lose_nothing(tmp_path):
    ranks, per_rank = 8, 12
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), r, per_rank)) for r in range(ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = TuneCache(tmp_path).entries()
    assert len(entries) == ranks * per_rank
    for r in range(ranks):
        for i in range(per_rank):
            key = make_key(seq_q=16 << (i % 10), head_dim=8 * (r + 1), gqa_group=i + 1)
            assert entries[key].time_ms == pytest.approx(r + i / 100)


def test_corrupt_file_is_reported_once_and_rebuilt(tmp_path, caplog):
    cache = TuneCache(tmp_path)
    cache.put(make_key(), make_entry())
    cache.path.write_text('{"format": "fusepass-autotune", "version": 1, "entries": {')  # truncated
    with caplog.at_level(logging.WARNING, logger="fusepass.autotune.cache"):
        assert cache.get(make_key()) is None
        assert cache.get(make_key()) is None
        assert cache.entries() == {}
        assert cache.put(make_key(direction="bwd"), make_entry(0.3))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "not valid JSON" in warnings[0].getMessage()
    assert set(cache.entries()) == {make_key(direction="bwd")}
    assert (tmp_path / "autotune.json.corrupt").exists()
    with pytest.raises(CacheFileError):
        cache.path.write_text("[]")
        cache.read_raw(strict=True)


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"format": "other"}',
                                  '{"format": "fusepass-autotune", "version": 99, "entries": {}}',
                                  '{"format": "fusepass-autotune", "version": 1, "entries": {"k": 3}}'])
def test_unreadable_documents_are_ignored(tmp_path, text):
    cache = TuneCache(tmp_path)
    cache.path.write_text(text)
    assert cache.entries() == {}
    assert cache.put(make_key(), make_entry())
    assert cache.get(make_key()) is not None


def test_unparsable_entries_are_kept_but_not_used(tmp_path):
    cache = TuneCache(tmp_path)
    cache.put(make_key(), make_entry())
    raw = json.loads(cache.path.read_text())
    raw["entries"]["k9;from-a-newer-fusepass"] = {"anything": 1}
    raw["entries"][make_key(direction="bwd").to_string()] = {"config": {"BLOCK_M": 1}}
    cache.path.write_text(json.dumps(raw))
    assert set(cache.entries()) == {make_key()}
    assert cache.get(make_key(direction="bwd")) is None
    cache.put(make_key(seq_q=8000), make_entry())
    assert "k9;from-a-newer-fusepass" in json.loads(cache.path.read_text())["entries"]


def test_entries_of_other_versions_are_never_used(tmp_path):
    cache = TuneCache(tmp_path)
    old_torch = make_key(torch_version="1.13.0")
    old_triton = make_key(triton_version="2.0.0")
    cache.put(old_torch, make_entry(0.1))
    cache.put(old_triton, make_entry(0.1))
    current = make_key()
    assert cache.get(current) is None
    cache.put(current, make_entry(0.2))
    assert cache.get(current).time_ms == 0.2
    reasons = stale_reasons(cache.entries())
    assert "torch 1.13.0" in reasons[old_torch] and "triton 2.0.0" in reasons[old_triton]
    assert reasons[current] == ""


def test_an_older_template_is_marked_stale(tmp_path):
    cache = TuneCache(tmp_path)
    cache.put(make_key(template_hash="old"), make_entry(tuned_at="2026-01-01T00:00:00+00:00"))
    cache.put(make_key(template_hash="new"), make_entry(tuned_at="2026-02-01T00:00:00+00:00"))
    cache.put(make_key(template_hash="old", head_dim=64), make_entry(tuned_at="2026-01-01T00:00:00+00:00"))
    reasons = stale_reasons(cache.entries())
    assert reasons[make_key(template_hash="old")] == "template changed since"
    assert reasons[make_key(template_hash="new")] == ""
    assert reasons[make_key(template_hash="old", head_dim=64)] == ""  # nothing newer for that problem


def test_export_import_round_trip(tmp_path):
    src, dst = TuneCache(tmp_path / "src"), TuneCache(tmp_path / "dst")
    keys = [make_key(seq_q=n, dtype=dt) for n in (64, 4096) for dt in ("bf16", "fp16")]
    for i, k in enumerate(keys):
        src.put(k, make_entry(0.1 * (i + 1)))
    dst.put(keys[0], make_entry(9.0))
    dst.put(make_key(gpu="Other GPU"), make_entry(1.0))
    out = tmp_path / "export.json"
    assert src.export_to(out, keys=[k.to_string() for k in keys[:3]]) == 3
    added, replaced = dst.import_from(out)
    assert (added, replaced) == (2, 1)
    got = dst.entries()
    for k in keys[:3]:
        assert got[k] == src.get(k)
    assert keys[3] not in got and make_key(gpu="Other GPU") in got


def test_import_rejects_foreign_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(CacheFileError):
        TuneCache(tmp_path / "c").import_from(bad)
    with pytest.raises(CacheFileError):
        TuneCache(tmp_path / "c").import_from(tmp_path / "missing.json")


def test_unwritable_directory_warns_once_and_does_not_raise(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = TuneCache(blocker / "sub")  # a directory below a file cannot be created
    with caplog.at_level(logging.WARNING, logger="fusepass.autotune.cache"):
        assert not cache.put(make_key(), make_entry())
        assert not cache.put(make_key(direction="bwd"), make_entry())
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_version_1_files_are_migrated(tmp_path):
    """Version 1 had one config type for both directions (a backward's BLOCK_N was the tile a
    program owns, BLOCK_M its step) and a warp_specialize knob no template read."""
    from fusepass.autotune.config import BackwardConfig

    cache = TuneCache(tmp_path)
    fwd_key, bwd_key = make_key(), make_key(direction="bwd")
    v1 = lambda m, n: {"BLOCK_M": m, "BLOCK_N": n, "num_warps": 8, "num_stages": 2, "warp_specialize": False}  # noqa: E731
    entry = lambda c: {**make_entry().to_json(), "config": c, "default_config": c, "runner_up": [[c, 0.9]]}  # noqa: E731
    doc = {"format": "fusepass-autotune", "version": 1,
           "entries": {fwd_key.to_string(): entry(v1(128, 64)), bwd_key.to_string(): entry(v1(64, 128))}}
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text(json.dumps(doc))
    assert cache.get(fwd_key).config == ForwardConfig(128, 64, 8, 2)
    got = cache.get(bwd_key)
    want = BackwardConfig(BLOCK_OWN=128, BLOCK_STEP=64, num_warps=8, num_stages=2)
    assert got.config == want and got.default_config == want and got.runner_up[0][0] == want
    cache.put(make_key(seq_q=8000), make_entry())  # the next write stores version 2
    raw = json.loads(cache.path.read_text())
    assert raw["version"] == 2 and raw["entries"][bwd_key.to_string()]["config"]["BLOCK_OWN"] == 128
