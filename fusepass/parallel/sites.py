"""What an attention site may hold under context parallelism, checked when it is compiled.

Under context parallelism every site must run as a ring: one left as the user wrote it, or
one whose extra operands are shaped by the local shard, would compute attention over this
rank's keys only, silently.  Such a site is an error naming it, not a refusal; so is an
attention-like site the matcher refused (backend.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

from fusepass.spec import AttentionSpec


class ContextParallelError(ValueError):
    pass


def refusal(spec: AttentionSpec, mask_shapes: Sequence[tuple]) -> Optional[str]:
    """Why the ring cannot serve this site, or None."""
    if spec.bias_shapes:
        return (f"an additive bias {spec.bias} (its values cover this rank's shard of the scores, not the "
                "whole sequence's)")
    if spec.dropout_p > 0:
        return f"dropout (p={spec.dropout_p}) on the attention weights"
    for shape in mask_shapes:
        if len(shape) < 2 or not _is_one(shape[-2]):
            return (f"a mask tensor of shape {list(shape)} that varies over queries (only key masks "
                    "[B, 1, 1, N] travel with their K/V chunk; a mask built from positions becomes a predicate)")
    if not _same(spec.q_shape[2], spec.k_shape[2]):
        return (f"{spec.q_shape[2]} queries against {spec.k_shape[2]} keys: q, k and v must be shards of one "
                "sequence (self-attention)")
    return None


def error(location: str, reason: str) -> ContextParallelError:
    return ContextParallelError(
        f"fusepass: option context_parallel: the attention at {location} cannot run as a ring: {reason}. "
        "Left as written it would attend to this rank's shard of the sequence only.")


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _same(a, b) -> bool:
    return a is b or bool(a == b)  # symbolic sizes: guarded equal, as the rewrite guards k against v
