"""One typed place for every fusepass option.

Options come from three places, later ones winning: the defaults below, ``FUSEPASS_*``
environment variables, and ``torch.compile(..., options={...})``.  An unknown key is an
error that names the valid ones.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
# How a context-parallel sequence is laid out over its ranks (fusepass/parallel/layout.py implements them).
CP_LAYOUTS = ("head_tail", "contiguous")


def _group_name(raw: Any, source: str) -> str:
    """The context_parallel option as a process group's name ("" = off): a 1-D DeviceMesh, a
    ProcessGroup or a name.  Imported here, not at the top: options must not import torch."""
    from fusepass.parallel.group import group_name

    return group_name(raw, source)


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
    # Run the generated Triton kernels on CPU tensors through Triton's interpreter; False
    # defers to FUSEPASS_INTERPRET.  Like autotune, it travels in the op calls this compile
    # emits (RunOptions), so two models compiled with different options keep theirs.
    interpret: bool = False
    # Read mask construction into position predicates (block skipping); False keeps masks as tensors.
    mask_predicates: bool = True
    # Context parallelism: the ranks that each hold a shard of the sequence, as a 1-D DeviceMesh, a
    # ProcessGroup or a group's name (kept as the name).  Every fused attention then runs as a ring
    # over that group (fusepass/parallel); "" = off.
    context_parallel: str = dataclasses.field(default="", metadata={"parse": _group_name})
    # Which positions each of those ranks holds: "head_tail" (torch's context_parallel default)
    # or "contiguous" (torch with load balancing turned off).
    context_parallel_layout: str = "head_tail"
    # FP8 (e4m3) forward for sites that need no gradient (inference), each guarded on its first
    # call against its own-dtype kernel (fusepass/ops/fp8_guard.py); training keeps its dtype.
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.inner not in INNER_COMPILERS:
            raise ValueError(
                f"fusepass: option inner={self.inner!r} is not one of {', '.join(INNER_COMPILERS)}"
            )
        if self.min_seq_len < 0:
            raise ValueError(f"fusepass: option min_seq_len must be >= 0, got {self.min_seq_len}")
        if self.context_parallel_layout not in CP_LAYOUTS:
            raise ValueError(f"fusepass: option context_parallel_layout={self.context_parallel_layout!r} is not "
                             f"one of {', '.join(CP_LAYOUTS)}")
        if self.context_parallel and not self.fuse:
            # An unfused attention would see only its rank's shard of the keys.
            raise ValueError("fusepass: option context_parallel needs fuse=True")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def run(self) -> "RunOptions":
        """What the op calls of this compile carry for their run."""
        cp = self.context_parallel or None
        return RunOptions(autotune=self.autotune, interpret=True if self.interpret else None,
                          cp_group=cp, cp_layout=self.context_parallel_layout if cp else None,
                          fp8=True if self.fp8 else None)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How one op call runs, as its compile asked: the op's ``run`` argument, a short string
    (custom ops take no objects) saved with the forward for its backward.  None: the process
    default (``FUSEPASS_AUTOTUNE`` / ``FUSEPASS_INTERPRET``), as for a direct call of the op."""

    autotune: Optional[bool] = None  # time kernel configs on the GPU
    interpret: Optional[bool] = None  # CPU tensors run the kernels in Triton's interpreter
    # Context parallelism: the process group's name (resolved per call) and the layout (one of
    # CP_LAYOUTS); both or neither.  The call then runs as a ring (fusepass/parallel/ring.py).
    cp_group: Optional[str] = dataclasses.field(default=None, metadata={"text": True})
    cp_layout: Optional[str] = dataclasses.field(default=None, metadata={"text": True})
    fp8: Optional[bool] = None  # the e4m3 forward, guarded (only the no-grad op honours it)

    def __post_init__(self) -> None:
        if (self.cp_group is None) != (self.cp_layout is None):
            raise ValueError("fusepass.attention: run options cp_group and cp_layout go together")
        if self.cp_layout is not None and self.cp_layout not in CP_LAYOUTS:
            raise ValueError(f"fusepass.attention: run option cp_layout={self.cp_layout!r} is not one of "
                             f"{', '.join(CP_LAYOUTS)}")
        if self.cp_group is not None and not _is_text_value(self.cp_group):
            raise ValueError(f"fusepass.attention: process group name {self.cp_group!r} cannot travel in a run "
                             "string (empty, or holds ',' or '=')")

    @property
    def context_parallel(self) -> bool:
        return self.cp_group is not None

    def local(self) -> "RunOptions":
        """The same run without context parallelism: what the ring's per-chunk calls get."""
        return dataclasses.replace(self, cp_group=None, cp_layout=None)

    def encode(self) -> str:
        return ",".join(f"{f.name}={v if f.metadata.get('text') else int(v)}" for f in dataclasses.fields(self)
                        if (v := getattr(self, f.name)) is not None)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def decode(text: str) -> "RunOptions":
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(RunOptions)}
        for item in filter(None, text.split(",")):
            name, _, value = item.partition("=")
            field = fields.get(name)
            if field is not None and field.metadata.get("text") and _is_text_value(value):
                values[name] = value
            elif field is not None and not field.metadata.get("text") and value in ("0", "1"):
                values[name] = value == "1"
            else:
                valid = ", ".join(f"{f.name}=<text>" if f.metadata.get("text") else f"{f.name}=0/1"
                                  for f in fields.values())
                raise ValueError(f"fusepass.attention: run option {item!r} is not one of {valid}")
        return RunOptions(**values)


def _is_text_value(value: str) -> bool:
    return bool(value) and "," not in value and "=" not in value


def _parse(field: dataclasses.Field, raw: Any, source: str) -> Any:
    if "parse" in field.metadata:
        return field.metadata["parse"](raw, source)
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
