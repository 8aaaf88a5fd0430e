"""Which global sequence positions each rank holds under context parallelism.

A sequence of S = W * L positions over W ranks, L per rank, in one of ``CP_LAYOUTS``:

    head_tail   S is cut into 2W chunks of L/2; rank r holds chunk r then chunk 2W-1-r.  Under a
                causal mask every rank then does the same work.  This is what torch's
                ``context_parallel()`` does by default (its _HeadTailLoadBalancer).
    contiguous  rank r holds [r*L, (r+1)*L): torch with load balancing turned off.

A rank's positions are one or two :class:`Segment` s of consecutive global positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fusepass.options import CP_LAYOUTS


@dataclasses.dataclass(frozen=True)
class Segment:
    """``length`` consecutive global positions from ``start``, stored from local index ``local``."""

    local: int
    start: int
    length: int

    @property
    def rows(self) -> slice:
        return slice(self.local, self.local + self.length)


@functools.lru_cache(maxsize=256)
def segments(layout: str, rank: int, world: int, local_len: int) -> tuple[Segment, ...]:
    """The segments of ``rank``'s shard of ``local_len`` positions."""
    if layout == "head_tail":
        if local_len % 2:
            raise ValueError(
                f"fusepass: the head_tail layout needs an even number of positions per rank, got {local_len}; "
                "torch's context_parallel() shards contiguously when the length is not a multiple of "
                "2 x world size: compile with context_parallel_layout='contiguous' then")
        c = local_len // 2
        return Segment(0, rank * c, c), Segment(c, (2 * world - 1 - rank) * c, c)
    if layout == "contiguous":
        return (Segment(0, rank * local_len, local_len),)
    raise ValueError(f"fusepass: layout {layout!r} is not one of {', '.join(CP_LAYOUTS)}")


def _local_len(seq_len: int, world: int, layout: str) -> int:
    per = 2 * world if layout == "head_tail" else world
    if seq_len % per:
        raise ValueError(f"fusepass: a sequence of {seq_len} does not split into {per} equal chunks "
                         f"({layout} layout over {world} ranks)")
    return seq_len // world


def positions(layout: str, rank: int, world: int, seq_len: int, device=None) -> Tensor:
    """The global positions rank ``rank`` holds, in its local order (int64 [L])."""
    segs = segments(layout, rank, world, _local_len(seq_len, world, layout))
    return torch.cat([torch.arange(s.start, s.start + s.length, device=device) for s in segs])


def shard_sequence(t: Tensor, dim: int, group: Optional[dist.ProcessGroup] = None, layout: str = "head_tail",
                   *, rank: Optional[int] = None, world: Optional[int] = None) -> Tensor:
    """This rank's shard of a whole-sequence tensor (a copy), as torch's ``context_parallel``
    would leave it; ``rank`` / ``world`` default to the group's."""
    rank = dist.get_rank(group) if rank is None else rank
    world = dist.get_world_size(group) if world is None else world
    return t.index_select(dim, positions(layout, rank, world, t.shape[dim], device=t.device))


def unshard_sequence(t: Tensor, dim: int, group: Optional[dist.ProcessGroup] = None,
                     layout: str = "head_tail") -> Tensor:
    """The whole sequence from every rank's shard (an all-gather over ``group``)."""
    world = dist.get_world_size(group)
    shards = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(shards, t.contiguous(), group=group)
    seq_len = t.shape[dim] * world
    order = torch.cat([positions(layout, r, world, seq_len, device=t.device) for r in range(world)])
    whole = torch.cat(shards, dim=dim)
    return whole.index_select(dim, torch.argsort(order))  # gathered order -> global order
