"""What Inductor's on-disk caches key a fusepass graph by, besides the graph.

Inductor's FX-graph cache and AOTAutograd's cache key a graph by its nodes, inputs and Inductor
config, and call a custom op's implementation a black box: a graph cached by one fusepass
version is reused by the next even when the op's fake (its output's layout) changed, and then
fails in ``assert_size_stride``.  The config's post-grad custom pass is the one slot whose
``uuid()`` both caches read, so the inner compile puts a pass there that does nothing and whose
uuid is a hash of fusepass's own source.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pathlib

log = logging.getLogger(__name__)

_PACKAGE = pathlib.Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of every Python file of the package (the op's schema, fake and layout live there)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _pass_type():
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # a torch without the interface: nothing to key by
        return None

    class FusepassIdentity(CustomGraphPass):
        """Changes no graph; its uuid names the fusepass source that built the graph."""

        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return "fusepass-" + source_hash()

    return FusepassIdentity


def config_patches(patches: dict) -> dict:
    """``patches`` (Inductor config patches for one compile) with the identity pass added in
    the post-grad pre-pass slot, unless that slot is taken (by the patches or the user's
    config: theirs stays, and the caches key by it alone)."""
    import torch._inductor.config as inductor_config

    pass_type = _pass_type()
    if pass_type is None or "post_grad_custom_pre_pass" in patches:
        return patches
    if inductor_config.post_grad_custom_pre_pass is not None:
        log.debug("fusepass: post_grad_custom_pre_pass is set; Inductor's caches will not key by fusepass's source")
        return patches
    return {**patches, "post_grad_custom_pre_pass": pass_type()}
