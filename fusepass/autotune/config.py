"""Kernel launch configurations: the knobs the autotuner searches over."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int  # query rows per program
    BLOCK_N: int  # key columns per inner-loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the key loop

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
