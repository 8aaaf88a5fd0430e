"""The context_parallel option's process group: a name at compile time, a group at run time.

The op's ``run`` string can carry only text, so a compile records the group's name and each
call resolves it again; nothing process-wide says which group a model runs over.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)


def _fail(msg: str):
    raise ValueError(f"fusepass: {msg}")


def group_name(target: Any, source: str = "option context_parallel") -> str:
    """The name of ``target``'s process group: a 1-D DeviceMesh, a ProcessGroup, a group's name
    (checked when torch.distributed is initialized), or None / "" (off, returned as "")."""
    if target is None or target == "":
        return ""
    if isinstance(target, str):
        if dist.is_available() and dist.is_initialized():
            resolve(target)  # fails now, naming the option, rather than on the first call
        return target
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(target, DeviceMesh):
        if target.ndim != 1:
            _fail(f"{source}: the mesh has {target.ndim} dimensions; pass its context-parallel dimension "
                  "(e.g. mesh['cp'])")
        target = target.get_group()
    if isinstance(target, dist.ProcessGroup):
        return target.group_name
    _fail(f"{source} must be a 1-D DeviceMesh, a ProcessGroup or a group name, got {type(target).__name__}")


def resolve(name: str) -> dist.ProcessGroup:
    """The live process group called ``name``."""
    if not (dist.is_available() and dist.is_initialized()):
        _fail(f"context parallelism over group {name!r} needs torch.distributed to be initialized")
    c10d = dist.distributed_c10d
    lookup = getattr(c10d, "_resolve_process_group", None)  # torch >= 2.3
    if lookup is not None:
        try:
            return lookup(name)
        except (RuntimeError, ValueError, KeyError) as e:
            _fail(f"no process group is called {name!r} ({e})")
    for group, known in c10d._world.pg_names.items():
        if known == name:
            return group
    _fail(f"no process group is called {name!r}")
