"""The ``fusepass`` command end to end on a cache the test builds: exit codes, tables, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from autotune_util import make_entry, make_key
from fusepass import cli
from fusepass.autotune.cache import TuneCache
from fusepass.autotune.config import ForwardConfig

REPO = Path(__file__).resolve().parents[1]
# The same ``main`` as ``python -m fusepass`` in a fresh process, through the real package
# (whose __init__ loads torch only when a name needs it): the cache commands must not import it.
LIGHT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    from fusepass.cli import main
    rc = main(sys.argv[1:])
    assert "torch" not in sys.modules, "cache commands must not import torch"
    sys.exit(rc)
""")
KEYS = {
    "h200_bf16_fwd": make_key(),
    "h200_bf16_bwd": make_key(direction="bwd", seq_q=4000, seq_k=4000),
    "h200_fp16_d64": make_key(dtype="fp16", head_dim=64, features=""),
    "a100_bf16": make_key(gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0)),
    "stale": make_key(torch_version="1.13.0", seq_q=64),
}


@pytest.fixture
def cache_dir(tmp_path):
    cache = TuneCache(tmp_path / "cache")
    for i, (name, key) in enumerate(KEYS.items()):
        cache.put(key, make_entry(0.1 * (i + 1), cfg=ForwardConfig(64 * (1 + i % 2), 64, 4, 2 + i % 2)))
    return tmp_path / "cache"


def run(args, cache_dir, *, light=True, cwd=REPO):
    env = {**os.environ, "FUSEPASS_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, "-c", LIGHT, *args] if light else [sys.executable, "-m", "fusepass", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_python_dash_m_fusepass(cache_dir):
    """The real entry point (once: the process imports torch through the package __init__)."""
    r = run(["cache", "list", "--json"], cache_dir, light=False)
    assert r.returncode == 0, r.stderr
    assert {row["key"] for row in json.loads(r.stdout)} == {k.to_string() for k in KEYS.values()}


def test_path(cache_dir, tmp_path):
    r = run(["cache", "path"], cache_dir)
    assert r.returncode == 0 and r.stdout.strip() == str(cache_dir / "autotune.json")
    r = run(["cache", "--cache-dir", str(tmp_path / "elsewhere"), "path", "--dir"], cache_dir)
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "elsewhere")
    assert "does not exist" in r.stderr


def test_list_table(cache_dir):
    r = run(["cache", "list"], cache_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = lines[0].split()
    for column in ("id", "gpu", "dtype", "shape", "mask", "config", "ms", "TFLOP/s", "status"):
        assert column in header
    for key in KEYS.values():
        row = [line for line in lines if line.startswith(key.short_id())]
        assert len(row) == 1, (key, r.stdout)
    stale_row = next(line for line in lines if line.startswith(KEYS["stale"].short_id()))
    assert "torch 1.13.0" in stale_row
    assert "B4 H16 M1000 N1000 D128" in r.stdout and "128x64 w4 s3" in r.stdout
    assert f"{len(KEYS)} of {len(KEYS)} entries" in r.stdout


@pytest.mark.parametrize("filters, expected", [
    (["--dtype", "fp16"], ["h200_fp16_d64"]),
    (["--dtype", "bfloat16", "--gpu", "a100"], ["a100_bf16"]),
    (["--gpu", "H200", "--head-dim", "128", "--direction", "bwd"], ["h200_bf16_bwd"]),
    (["--stale"], ["stale"]),
    (["--current", "--gpu", "h200", "--dtype", "bf16"], ["h200_bf16_fwd", "h200_bf16_bwd"]),
    (["--head-dim", "256"], []),
])
def test_list_json_filters(cache_dir, filters, expected):
    r = run(["cache", "list", "--json", *filters], cache_dir)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted(row["key"] for row in rows) == sorted(KEYS[n].to_string() for n in expected)
    for row in rows:
        assert row["id"] == make_key().__class__.from_string(row["key"]).short_id()
        assert row["entry"]["config"]["BLOCK_M"] in (64, 128) and row["entry"]["time_ms"] > 0
        assert (row["stale"] != "") == (row["key"] == KEYS["stale"].to_string())


def test_show(cache_dir):
    key = KEYS["h200_bf16_bwd"]
    r = run(["cache", "show", key.short_id()[:6]], cache_dir)
    assert r.returncode == 0, r.stderr
    assert key.to_string() in r.stdout and "runner" not in r.stderr
    assert "rank" in r.stdout and "speedup over default" in r.stdout
    r = run(["cache", "show", key.to_string(), "--json"], cache_dir)
    data = json.loads(r.stdout)
    assert data["fields"]["direction"] == "bwd" and data["fields"]["m_bucket"] == 4096
    assert data["entry"]["runner_up"] and data["speedup_over_default"] == pytest.approx(1.5)


@pytest.mark.parametrize("args, code, message", [
    (["cache", "show", "zzzzzz"], 1, "no entry with id"),
    (["cache", "show", "ab"], 1, "too short"),
    (["cache", "show", "k1;gpu=x"], 1, "lacks"),
    (["cache", "list", "--dtype", "int8"], 2, "unknown dtype"),
    (["cache", "list", "--head-dim", "-3"], 2, "not positive"),
    (["cache", "list", "--stale", "--current"], 2, "not allowed"),
    (["cache", "frobnicate"], 2, "invalid choice"),
    ([], 2, "required"),
    (["cache", "import", "/nonexistent/file.json"], 1, "no such file"),
    (["kernel"], 2, "required"),  # the kernels provide subcommands (kernel show)
])
def test_errors_exit_non_zero(cache_dir, args, code, message):
    r = run(args, cache_dir)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr


def test_missing_cache_reads_as_empty(tmp_path):
    # As `pip list` in a fresh environment: nothing tuned yet is not an error.
    for args, says in ((["cache", "list"], "no entries"), (["cache", "show", "abcdef"], "is empty"),
                       (["cache", "clear"], "nothing to clear")):
        r = run(args, tmp_path / "missing")
        assert r.returncode == 0 and says in r.stdout, (args, r.stdout, r.stderr)
    r = run(["cache", "list", "--json"], tmp_path / "missing")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    assert not (tmp_path / "missing").exists(), "reading a cache must not create it"


def test_cache_dir_after_the_action_and_version(cache_dir, tmp_path):
    before = run(["cache", "list"], cache_dir)
    after = subprocess.run([sys.executable, "-c", LIGHT, "cache", "list", "--cache-dir", str(cache_dir)],
                           capture_output=True, text=True, env={**os.environ, "FUSEPASS_CACHE_DIR": str(tmp_path)})
    assert after.returncode == 0 and after.stdout == before.stdout
    r = subprocess.run([sys.executable, "-c", LIGHT, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "fusepass 0.1.0"


@pytest.mark.parametrize("args, message", [
    (["kernel", "show", "fwd", "--pred", "j <="], "not an expression"),
    (["kernel", "show", "fwd", "--head-dim", "-3"], "not in [1,"),
    (["kernel", "show", "fwd", "--biases", "x"], "not an integer"),
])
def test_bad_kernel_arguments_are_one_line_errors(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fusepass", *args], capture_output=True, text=True, cwd=REPO)
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_clear_with_filters_then_all(cache_dir):
    r = run(["cache", "clear", "--gpu", "a100"], cache_dir)
    assert r.returncode == 0 and "removed 1 of 5" in r.stdout
    left = set(TuneCache(cache_dir).entries())
    assert left == set(KEYS.values()) - {KEYS["a100_bf16"]}
    r = run(["cache", "clear", "--stale"], cache_dir)
    assert "removed 1 of 4" in r.stdout and KEYS["stale"] not in TuneCache(cache_dir).entries()
    r = run(["cache", "clear"], cache_dir)
    assert r.returncode == 0 and TuneCache(cache_dir).entries() == {}
    r = run(["cache", "list"], cache_dir)
    assert r.returncode == 0 and "no entries" in r.stdout


def test_corrupt_cache(cache_dir):
    (cache_dir / "autotune.json").write_text("{ not json")
    r = run(["cache", "list"], cache_dir)
    assert r.returncode == 1 and "not valid JSON" in r.stderr and "cache clear" in r.stderr
    r = run(["cache", "clear"], cache_dir)
    assert r.returncode == 0, r.stderr
    assert run(["cache", "list", "--json"], cache_dir).stdout.strip() == "[]"


def test_export_import_round_trip(cache_dir, tmp_path):
    out = tmp_path / "h200.json"
    r = run(["cache", "export", str(out), "--gpu", "h200"], cache_dir)
    assert r.returncode == 0 and "exported 4 of 5" in r.stdout
    r = run(["cache", "export", str(out)], cache_dir)
    assert r.returncode == 1 and "--force" in r.stderr
    assert run(["cache", "export", str(out), "--force", "--gpu", "h200"], cache_dir).returncode == 0
    other = tmp_path / "other"
    r = run(["cache", "import", str(out)], other)
    assert r.returncode == 0 and "4 new, 0 replaced" in r.stdout
    assert "other versions" in r.stderr  # the stale entry came along and is flagged
    src, dst = TuneCache(cache_dir).entries(), TuneCache(other).entries()
    assert dst == {k: e for k, e in src.items() if "H200" in k.gpu}
    r = run(["cache", "import", str(out)], other)
    assert "0 new, 4 replaced" in r.stdout
    (tmp_path / "junk.json").write_text('{"a": 1}')
    r = run(["cache", "import", str(tmp_path / "junk.json")], other)
    assert r.returncode == 1 and "not a fusepass autotune cache" in r.stderr


def test_demo_is_called_with_its_arguments(monkeypatch):
    seen = []
    demo = types.ModuleType("fusepass.demo")
    demo.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fusepass.demo", demo)
    assert cli.main(["demo", "--help", "--steps", "2"]) == 3
    assert seen == [["--help", "--steps", "2"]]


def test_demo_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fusepass.demo", None)  # import raises ModuleNotFoundError
    assert cli.main(["demo"]) == 1
    assert "demo is not available" in capsys.readouterr().err


def test_kernel_commands_come_from_the_kernels(monkeypatch, capsys):
    module = types.ModuleType("fusepass.kernels.cli")

    def add_cli_commands(subparsers):
        kernel = subparsers.add_parser("kernel")
        p = kernel.add_subparsers(dest="kernel_command", required=True).add_parser("show")
        p.add_argument("--direction", default="fwd")
        p.set_defaults(func=lambda args: print(f"kernel source {args.direction}") or 0)

    module.add_cli_commands = add_cli_commands
    monkeypatch.setitem(sys.modules, "fusepass.kernels.cli", module)
    assert cli.main(["kernel", "show", "--direction", "bwd"]) == 0
    assert "kernel source bwd" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["kernel", "nope"])
    assert e.value.code == 2
