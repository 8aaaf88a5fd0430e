"""The ring: each rank sends tensors to the next rank and receives the previous rank's.

Point-to-point through torch.distributed (``batch_isend_irecv`` on the process group), so it
works on every backend torch supports for it (gloo, NCCL).  Every exchange is counted in
``torch._dynamo.utils.counters["fusepass"]["cp_ring_exchanges"]``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._dynamo.utils import counters

log = logging.getLogger(__name__)


class InFlight:
    """Tensors on their way from the previous rank; ``wait()`` returns them."""

    def __init__(self, works, received: list[Tensor], sent: list[Tensor]) -> None:
        self._works, self._received = works, received
        self._sent = sent  # the send buffers must live until the sends complete

    def wait(self) -> list[Tensor]:
        for work in self._works:
            work.wait()
        self._sent = []
        return self._received


class Ring:
    """This rank's place in a ring over ``group``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.world = group.size()
        self.rank = dist.get_rank(group)
        # P2POp takes global ranks.
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def source(self, step: int) -> int:
        """Whose chunk this rank holds after ``step`` shifts."""
        return (self.rank - step) % self.world

    def shift(self, tensors: Sequence[Tensor]) -> InFlight:
        """Send ``tensors`` to the next rank and receive the previous rank's (same shapes and dtypes)."""
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self._next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self.group) for t in received]
        works = dist.batch_isend_irecv(ops)
        counters["fusepass"]["cp_ring_exchanges"] += 1
        return InFlight(works, received, sent)
