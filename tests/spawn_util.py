"""Spawning CPU ranks (gloo) from a test, bounded in time."""

from __future__ import annotations

import tempfile

import pytest
import torch.multiprocessing as mp


def run_ranks(worker, args: tuple, world: int, tmp_path, timeout_s: float, what: str) -> None:
    """Run ``worker(rank, *args, init_file)`` on ``world`` spawned processes (``init_file``: a
    fresh path under ``tmp_path`` for ``init_method="file://..."``); fail the test naming
    ``what`` if they have not all finished after ``timeout_s`` seconds."""
    init_file = tempfile.mktemp(dir=tmp_path)
    ctx = mp.start_processes(worker, args=(*args, init_file), nprocs=world, join=False, start_method="spawn")
    left = timeout_s
    while not ctx.join(timeout=2):
        left -= 2
        if left <= 0:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what}: ranks did not finish in {timeout_s} s")
