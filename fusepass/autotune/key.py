"""The autotune cache key: everything that can change which config is fastest, or whether a
config still means the same kernel.

Sequence lengths are bucketed (next power of two, with a floor) so that a model called with
a new length every step tunes once per bucket, not once per length; the kernels handle any
length inside a bucket, the config only decides tiling.

The string form (:meth:`TuneKey.to_string`) is what the cache file stores: ``name=value``
pairs in a fixed order joined by ``;``, values percent-escaped, prefixed by a format tag.
It is stable across runs and versions of this module (new fields are appended with a default).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import sys
from typing import Any
from urllib.parse import quote, unquote

from .config import dtype_name

KEY_FORMAT = "k1"
DIRECTIONS = ("fwd", "bwd")

# Lengths up to this share one bucket: it is the smallest tile (MIN_BLOCK in space.py), and
# below one tile the length no longer changes how many tiles run.
BUCKET_FLOOR = 16

# Short names of the fields in the string form, in order.
_FIELD_NAMES = {
    "gpu": "gpu",
    "capability": "cc",
    "torch_version": "torch",
    "triton_version": "triton",
    "template_hash": "tpl",
    "dtype": "dtype",
    "head_dim": "d",
    "value_head_dim": "dv",
    "features": "feat",
    "gqa_group": "g",
    "m_bucket": "m",
    "n_bucket": "n",
    "direction": "dir",
}
_SHORT_TO_FIELD = {v: k for k, v in _FIELD_NAMES.items()}
# The fields that say which build of which kernel a config belongs to; an entry whose values
# here differ from the running process's is stale and never used.
BUILD_FIELDS = ("torch_version", "triton_version", "template_hash")
# Escape the separators (and '%' itself); keep everything a GPU name or signature normally uses.
_SAFE = " .,+-_:/()[]<>*!@#$^&|~'\"{}"


def bucket(n: int, floor: int = BUCKET_FLOOR) -> int:
    """The length bucket of ``n``: the next power of two >= n, at least ``floor``."""
    n = int(n)
    if n < 0:
        raise ValueError(f"fusepass: a sequence length cannot be negative, got {n}")
    return max(int(floor), 1 << max(0, n - 1).bit_length())


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(dist)
        return str(getattr(module, "__version__", "none"))


@functools.lru_cache(maxsize=None)
def current_versions() -> tuple[str, str]:
    """(torch version, triton version) of this process, read without importing either
    (``importlib.metadata``), so the CLI and the runtime agree on the same strings."""
    return _version("torch"), _version("triton")


@dataclasses.dataclass(frozen=True)
class TuneKey:
    gpu: str  # device name, e.g. "NVIDIA H200"
    capability: str  # compute capability "9.0"
    torch_version: str
    triton_version: str
    template_hash: str  # from the kernel side: changes whenever the generated kernel does
    dtype: str  # short name: "bf16", "fp16", "fp32", "fp8e4m3"
    head_dim: int  # D of q and k
    value_head_dim: int  # Dv
    features: str  # mask/feature signature from the kernel side, e.g. "causal+softcap"; "" = none
    gqa_group: int  # query heads per key/value head
    m_bucket: int  # bucket(M): query length
    n_bucket: int  # bucket(N): key length
    direction: str  # "fwd" or "bwd"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"fusepass: direction must be one of {DIRECTIONS}, got {self.direction!r}")
        for name in ("head_dim", "value_head_dim", "gqa_group", "m_bucket", "n_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"fusepass: TuneKey.{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @classmethod
    def build(
        cls,
        *,
        gpu: str,
        capability: str | tuple[int, int],
        template_hash: str,
        dtype: Any,
        head_dim: int,
        seq_q: int,
        seq_k: int,
        direction: str,
        value_head_dim: int | None = None,
        features: str = "",
        gqa_group: int = 1,
        torch_version: str | None = None,
        triton_version: str | None = None,
    ) -> "TuneKey":
        """A key from real sizes: buckets the lengths and fills in this process's versions."""
        if not isinstance(capability, str):
            capability = f"{capability[0]}.{capability[1]}"
        torch_now, triton_now = current_versions()
        return cls(
            gpu=gpu,
            capability=capability,
            torch_version=torch_version or torch_now,
            triton_version=triton_version or triton_now,
            template_hash=template_hash,
            dtype=dtype_name(dtype),
            head_dim=int(head_dim),
            value_head_dim=int(value_head_dim or head_dim),
            features=features,
            gqa_group=int(gqa_group),
            m_bucket=bucket(seq_q),
            n_bucket=bucket(seq_k),
            direction=direction,
        )

    def to_string(self) -> str:
        parts = [KEY_FORMAT]
        for field, short in _FIELD_NAMES.items():
            parts.append(f"{short}={quote(str(getattr(self, field)), safe=_SAFE)}")
        return ";".join(parts)

    @classmethod
    def from_string(cls, text: str) -> "TuneKey":
        """Inverse of :meth:`to_string`; ValueError on anything malformed."""
        parts = text.split(";")
        if not parts or parts[0] != KEY_FORMAT:
            raise ValueError(f"fusepass: not a tune key (expected it to start with {KEY_FORMAT!r}): {text!r}")
        values: dict[str, Any] = {}
        for part in parts[1:]:
            short, sep, raw = part.partition("=")
            if not sep or short not in _SHORT_TO_FIELD:
                raise ValueError(f"fusepass: malformed tune key field {part!r} in {text!r}")
            values[_SHORT_TO_FIELD[short]] = unquote(raw)
        missing = [f for f in _FIELD_NAMES if f not in values]
        if missing:
            raise ValueError(f"fusepass: tune key {text!r} lacks {missing}")
        for field in dataclasses.fields(cls):
            if field.type in ("int", int):
                try:
                    values[field.name] = int(values[field.name])
                except ValueError:
                    raise ValueError(f"fusepass: tune key field {field.name}={values[field.name]!r} is not an int") from None
        return cls(**values)

    def short_id(self) -> str:
        """A 10-hex-digit id of the key (for the CLI: ``fusepass cache show ID``)."""
        return hashlib.sha1(self.to_string().encode()).hexdigest()[:10]

    def is_current(self, torch_version: str | None = None, triton_version: str | None = None,
                   template_hashes: "set[str] | None" = None) -> bool:
        """Do the key's versions match this process's (and, if known, a current template hash)?"""
        torch_now, triton_now = current_versions()
        if self.torch_version != (torch_version or torch_now):
            return False
        if self.triton_version != (triton_version or triton_now):
            return False
        return template_hashes is None or self.template_hash in template_hashes

    def describe(self) -> str:
        """One line for logs: ``fwd bf16 d128 M<=1024 N<=1024 g1 causal``."""
        dv = f"/{self.value_head_dim}" if self.value_head_dim != self.head_dim else ""
        feats = f" {self.features}" if self.features else ""
        return (
            f"{self.direction} {self.dtype} d{self.head_dim}{dv} M<={self.m_bucket} N<={self.n_bucket} "
            f"g{self.gqa_group}{feats}"
        )

    def without_build(self) -> tuple:
        """The key minus the build fields: two entries equal here tune the same problem."""
        return tuple(getattr(self, f) for f in _FIELD_NAMES if f not in BUILD_FIELDS)
