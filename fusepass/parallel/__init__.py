"""Context parallelism: the sequence sharded over ranks, every fused attention a ring over them.

    group.py     the context_parallel option: a mesh or group as a name, and back at run time
    layout.py    which global positions each rank holds (torch's head-tail layout, or contiguous)
    global_predicate.py  a chunk pair's mask predicate on global positions; does it hide all
    merge.py     partial outputs merged by their log-sum-exp
    exchange.py  the ring: K/V (and their gradients) passed to the next rank
    ring.py      the op's forward and backward as a ring (fusepass/ops/dispatch.py routes there)
    sites.py     what a site may hold under context parallelism (checked at compile time)

Nothing here is imported by ``import fusepass``; the helpers load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {"shard_sequence": "fusepass.parallel.layout", "unshard_sequence": "fusepass.parallel.layout"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fusepass.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
