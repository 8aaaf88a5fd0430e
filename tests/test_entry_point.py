"""How users reach the backend: the ``torch_dynamo_backends`` entry point, ``import fusepass``,
and the options (unknown ones are an error naming the valid ones)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A small attention written the plain way, compiled, compared with eager; prints one JSON line.
_PROGRAM = textwrap.dedent(
    """
    import json, math, sys
    import torch

    def attention(q, k, v):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        return torch.softmax(s, dim=-1) @ v

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    imported_before = "fusepass" in sys.modules
    out = torch.compile(attention, backend="fusepass", options={"inner": "aot_eager"})(q, k, v)
    from torch._dynamo.utils import counters
    print(json.dumps({
        "imported_before_compile": imported_before,
        "fused": counters["fusepass"]["attention_fused"],
        "max_diff": (out - attention(q, k, v)).abs().max().item(),
    }))
    """
)

# Hides every torch_dynamo_backends entry point, so only an import can register the backend.
_HIDE_ENTRY_POINTS = textwrap.dedent(
    """
    import importlib.metadata as _md
    _real_entry_points = _md.entry_points
    def _entry_points(**kw):
        if kw.get("group") == "torch_dynamo_backends":
            return _md.EntryPoints([])
        return _real_entry_points(**kw)
    _md.entry_points = _entry_points
    """
)


def _run(program: str, cwd: Path, extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    proc = subprocess.run(
        [sys.executable, "-c", program], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_entry_point_works_in_fresh_process_without_import(tmp_path):
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    if "fusepass" not in names:
        pytest.skip("fusepass is not installed (no torch_dynamo_backends entry point): run `pip install -e .`")
    # cwd is an empty folder and PYTHONPATH is unset, so the source tree is not importable by
    # accident: only the installed entry point can find the backend.
    result = _run(_PROGRAM, cwd=tmp_path)
    assert result["imported_before_compile"] is False
    assert result["fused"] == 1
    assert result["max_diff"] < 1e-5


def test_import_registers_backend(tmp_path):
    result = _run(_HIDE_ENTRY_POINTS + "import fusepass\n" + _PROGRAM, cwd=tmp_path, extra_path=REPO)
    assert result["fused"] == 1
    assert result["max_diff"] < 1e-5


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def test_unknown_option_is_an_error_naming_the_valid_ones():
    import fusepass  # noqa: F401  (registers the backend)
    from fusepass.options import Options

    q = torch.randn(1, 2, 8, 4)
    compiled = torch.compile(_attention, backend="fusepass", options={"inner": "aot_eager", "no_such_option": 1})
    with pytest.raises(Exception) as info:
        compiled(q, q, q)
    message = str(info.value)
    assert "no_such_option" in message
    missing = [name for name in Options.field_names() if name not in message]
    assert not missing, f"the error does not name the valid options {missing}: {message}"


def test_unknown_inner_compiler_is_an_error_naming_the_valid_ones():
    import fusepass  # noqa: F401
    from fusepass.options import INNER_COMPILERS

    q = torch.randn(1, 2, 8, 4)
    compiled = torch.compile(_attention, backend="fusepass", options={"inner": "no_such_compiler"})
    with pytest.raises(Exception) as info:
        compiled(q, q, q)
    message = str(info.value)
    assert "no_such_compiler" in message
    assert all(name in message for name in INNER_COMPILERS), message
