"""fusepass: a torch.compile backend that fuses attention written as ordinary code.

    model = torch.compile(model, backend="fusepass")
    print(fusepass.explain(model, *example_args))

Importing fusepass does not import torch: the names below load on first use, so that the
``fusepass cache`` commands start in a fraction of a second.  The backend is registered
by the installed entry point; without one (``PYTHONPATH`` use), importing fusepass
registers it as soon as ``torch._dynamo`` is imported (at once if it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "AttentionSpec": "fusepass.spec",
    "SiteRecord": "fusepass.spec",
    "ExplainReport": "fusepass.report",
    "explain": "fusepass.report",
    "fused_attention": "fusepass.ops.attention",
    "Options": "fusepass.options",
    "resolve_options": "fusepass.options",
    "fusepass_backend": "fusepass.backend",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fusepass' has no attribute {name!r}")
    _register_backend()
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def _register_backend() -> None:
    """Register "fusepass" with Dynamo unless the installed entry point already provides it.

    When installed, Dynamo loads the entry point and registers the name itself; registering it
    here too would make Dynamo's own registration fail with a duplicate name.
    """
    from torch._dynamo.backends import registry

    discover = getattr(registry, "_discover_entrypoint_backends", None)
    if discover is not None:
        discover()
    if "fusepass" in getattr(registry, "_BACKENDS", {}) or "fusepass" in getattr(registry, "_COMPILER_FNS", {}):
        return
    from .backend import fusepass_backend

    registry.register_backend(compiler_fn=fusepass_backend, name="fusepass")


class _RegisterWithDynamo(importlib.abc.MetaPathFinder):
    """Registers the backend right after ``torch._dynamo`` is imported (by torch.compile),
    for a process that imported fusepass before torch and has no entry point installed."""

    def find_spec(self, name, path, target=None):
        if name != "torch._dynamo":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_backend()

        spec.loader.exec_module = exec_then_register
        return spec


if "torch._dynamo" in sys.modules:
    _register_backend()
else:
    sys.meta_path.insert(0, _RegisterWithDynamo())
