"""fusepass: a torch.compile backend that fuses attention written as ordinary code.

    model = torch.compile(model, backend="fusepass")
    print(fusepass.explain(model, *example_args))
"""

from __future__ import annotations

from .backend import fusepass_backend
from .explain import ExplainReport, explain
from .ops.attention import fused_attention
from .options import Options, resolve_options
from .spec import AttentionSpec, SiteRecord

__all__ = [
    "AttentionSpec", "ExplainReport", "Options", "SiteRecord", "explain", "fused_attention",
    "fusepass_backend", "resolve_options",
]
__version__ = "0.1.0"


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
    registry.register_backend(compiler_fn=fusepass_backend, name="fusepass")


_register_backend()
