"""One typed place for every fusepass option.

Options come from three places, later ones winning: the defaults below, ``FUSEPASS_*``
environment variables, and ``torch.compile(..., options={...})``.  An unknown key is an
error that names the valid ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

log = logging.getLogger(__name__)

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class Options:
    # Compiler for everything that is not attention: "inductor", "aot_eager" or "eager".
    inner: str = "inductor"
    # Master switch: False leaves every attention as the user wrote it.
    fuse: bool = True
    # Sites whose key length is known and shorter than this are left alone (not worth a launch).
    min_seq_len: int = 0
    # Tune kernel configs by timing them on the GPU; False picks a heuristic default.
    autotune: bool = True
    # Run the generated Triton kernels through Triton's interpreter (CPU tensors allowed).
    # Like autotune, it applies process-wide from the latest compile: the op carries no options.
    interpret: bool = False
    # Read mask construction into position predicates (block skipping); False keeps masks as tensors.
    mask_predicates: bool = True

    def __post_init__(self) -> None:
        if self.inner not in INNER_COMPILERS:
            raise ValueError(
                f"fusepass: option inner={self.inner!r} is not one of {', '.join(INNER_COMPILERS)}"
            )
        if self.min_seq_len < 0:
            raise ValueError(f"fusepass: option min_seq_len must be >= 0, got {self.min_seq_len}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _parse(field: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"fusepass: {source} must be a boolean (1/0, true/false), got {raw!r}")
    if kind == "int":
        if isinstance(raw, bool):
            raise ValueError(f"fusepass: {source} must be an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"fusepass: {source} must be an integer, got {raw!r}") from None
    return str(raw)


def resolve_options(user: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Options:
    """Defaults, then ``FUSEPASS_<NAME>`` environment variables, then ``user``."""
    env = os.environ if env is None else env
    fields = {f.name: f for f in dataclasses.fields(Options)}
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"FUSEPASS_{name.upper()}"
        if key in env:
            values[name] = _parse(field, env[key], key)
    for name, raw in (user or {}).items():
        if name not in fields:
            raise ValueError(
                f"fusepass: unknown option {name!r}; valid options are: {', '.join(fields)}"
            )
        values[name] = _parse(fields[name], raw, f"option {name}")
    options = Options(**values)
    log.debug("fusepass options: %s", options)
    return options
