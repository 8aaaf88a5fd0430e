"""``TORCH_LOGS=+fusepass`` turns on fusepass's log: fused sites at INFO, refusals and their
reasons at DEBUG, through torch's own handlers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from fusepass import logs

PROGRAM = """
import torch, fusepass
opts = {"inner": "aot_eager"}
torch.compile(lambda q: torch.softmax(q @ q.transpose(-1, -2), -1) @ q, backend="fusepass", options=opts)(
    torch.randn(1, 2, 8, 4))
torch.compile(lambda q: torch.softmax(q @ q.transpose(-1, -2), -2) @ q, backend="fusepass", options=opts)(
    torch.randn(1, 2, 8, 4))
"""


def _stderr(torch_logs: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}  # torch refuses an empty one
    if torch_logs is not None:
        env["TORCH_LOGS"] = torch_logs
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_torch_logs_plus_fusepass_shows_fused_sites_and_refusals():
    err = _stderr("+fusepass")
    assert "fused attention at" in err
    assert "not fusing attention at" in err and "axis" in err  # the refusal's reason: softmax over queries


def test_without_fusepass_in_torch_logs_nothing_is_logged():
    err = _stderr(None)
    assert "fused attention at" not in err and "not fusing attention" not in err


def test_levels_follow_torch_s_prefixes():
    assert logs.requested_level("+fusepass") == logging.DEBUG
    assert logs.requested_level("dynamo,fusepass") == logging.INFO
    assert logs.requested_level("-fusepass, +dynamo") == logging.ERROR
    assert logs.requested_level("+dynamo") is None and logs.requested_level("") is None
