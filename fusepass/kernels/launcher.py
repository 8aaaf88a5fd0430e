"""Launching a rendered kernel without Triton's per-call argument binding.

``JITFunction.run`` binds and specializes every argument on every launch: with our ~40
arguments that is most of a launch's host time (measured on the H200: 34-48 µs a bare launch,
of which the compiled launcher itself is a few).  A :class:`Launcher` belongs to one launch
plan, whose argument types are fixed by the plan's call signature.  It remembers Triton's
compiled kernel by what Triton's specialization reads from the values that can change between
calls (whether each pointer is 16-byte aligned, the classes of ints Triton specializes on:
see ``arg_key``), and on a hit calls the compiled kernel's launcher directly, as
``JITFunction.run`` ends by doing.

Anything this module does not recognize goes through ``JITFunction.run`` unchanged: the
interpreter, a Triton without the launcher interface (feature-tested once), launch hooks set
by a profiler, another device current than the one the kernel was loaded on.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

# Launches that skipped JITFunction.run, by kernel name: what tests read to know the direct
# path really ran.
direct_launches: collections.Counter = collections.Counter()

_MAX_KERNELS = 256  # per launcher


@functools.lru_cache(maxsize=1)
def _runtime():
    """(knobs.runtime, get_current_device, get_current_stream) of this process's Triton, or None
    when it lacks the interface the direct path needs (Triton >= 3.3 has it)."""
    try:
        from triton import knobs
        from triton.runtime.driver import driver

        active = driver.active
        return knobs.runtime, active.get_current_device, active.get_current_stream
    except Exception as e:  # no Triton, or one laid out differently: always JITFunction.run
        log.debug("fusepass: kernels launch through JITFunction.run (%s)", e)
        return None


def _unset(hook) -> bool:
    """No launch hook: None (Triton <= 3.5) or an empty HookChain (later ones, whose
    JITFunction.run then hands the launcher the empty chain, which calls nothing)."""
    return hook is None or getattr(hook, "calls", None) == []


def _trailing_values(fn, n_positional: int, consts: dict) -> Optional[tuple]:
    """Values of the kernel's parameters after the first ``n_positional`` (the constexprs we
    pass by name, else their defaults), in signature order: the rest of the argument list
    ``JITFunction.run`` hands the compiled launcher.  None when one has no value."""
    params = list(inspect.signature(fn.fn).parameters.values())[n_positional:]
    values = []
    for p in params:
        if p.name in consts:
            values.append(consts[p.name])
        elif p.default is not inspect.Parameter.empty:
            values.append(p.default)
        else:
            return None
    if set(consts) - {p.name for p in params}:
        return None  # a keyword the kernel does not take: let Triton report it
    return tuple(values)


_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


def arg_key(args) -> tuple:
    """What Triton's specialization reads from per-call values, and no more: pointers by 16-byte
    alignment (their dtypes are fixed by the plan that owns the launcher); ints by whether they
    are 1, divisible by 16, and fit int32 / int64 (Triton's type and its two specializations);
    floats not at all (always fp32, never specialized); bools and None by value.  A cache length
    that grows by one key per decode step then keeps hitting the same compiled kernel instead of
    a new key (and a JITFunction.run) per length."""
    return tuple([
        ((a == 1) + 2 * (a % 16 == 0) + 4 * (a < _I32_MIN or a > _I32_MAX) + 8 * (a > _I64_MAX))
        if a.__class__ is int else
        ("f" if a.__class__ is float else (a if a is None or a.__class__ is bool else a.data_ptr() % 16 == 0))
        for a in args])


_last_tail: tuple = (None, ())  # the tail keyed last by any launcher, and its key (one object: threads)


def _tail_key(tail) -> tuple:
    """arg_key of ``tail``, shared between launchers: the two decode kernels of one step take
    the same tail object, built anew each step of a growing cache."""
    global _last_tail
    last = _last_tail
    if last[0] is tail:
        return last[1]
    key = arg_key(tail)
    _last_tail = (tail, key)
    return key


class Launcher:
    """One rendered kernel of one launch plan, with its constexprs and launch options."""

    def __init__(self, fn: Any, consts: dict, num_warps: Optional[int] = None, num_stages: Optional[int] = None, *,
                 direct: bool = True) -> None:
        self.fn = fn
        self.consts = consts
        # None: Triton's default for the device.
        self.options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
        self.name = getattr(fn, "__name__", "kernel")
        self._direct = direct and _runtime() is not None
        self._trailing: Optional[tuple] = None
        self._kernels: dict = {}
        self._tail: Any = None  # the last fixed tail and its arg_key
        self._tail_key: tuple = ()

    def __call__(self, grid: tuple, *args, tail: Sequence = ()) -> None:
        """Launch on ``args`` then ``tail``: the same argument list either way, but a ``tail``
        passed again as the same object (a plan's fixed strides and scalars) is keyed once."""
        if self._direct:
            runtime, current_device, current_stream = _runtime()
            if _unset(runtime.launch_enter_hook) and _unset(runtime.launch_exit_hook):
                device = current_device()
                if tail is not self._tail:
                    self._tail, self._tail_key = tail, _tail_key(tail)
                key = (device, arg_key(args), self._tail_key)
                hit = self._kernels.get(key)
                if hit is not None:
                    run, function, metadata = hit
                    g = (*grid, 1, 1)
                    run(g[0], g[1], g[2], current_stream(device), function, metadata, None, None, None,
                        *args, *tail, *self._trailing)
                    direct_launches[self.name] += 1
                    return
                self._remember(key, self.fn[grid](*args, *tail, **self.consts, **self.options), len(args) + len(tail))
                return
        self.fn[grid](*args, *tail, **self.consts, **self.options)

    def _remember(self, key: tuple, kernel: Any, n_args: int) -> None:
        """Keep the compiled kernel ``JITFunction.run`` returned, if it has the launcher interface."""
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        if self._trailing is None:
            self._trailing = _trailing_values(self.fn, n_args, self.consts)
        try:
            entry = (kernel.run, kernel.function, kernel.packed_metadata)
        except AttributeError as e:
            entry = None
            log.debug("fusepass: %s launches through JITFunction.run (%s)", self.name, e)
        if entry is None or self._trailing is None:
            self._direct = False
            return
        if len(self._kernels) >= _MAX_KERNELS:
            self._kernels.clear()
        self._kernels[key] = entry
