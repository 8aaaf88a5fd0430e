"""Kernel launch configurations: the knobs the autotuner searches over, and what prunes them.

A :class:`ForwardConfig` or :class:`BackwardConfig` is what a launcher needs besides the tensors.  The pruning predicates
below are deliberately simple, named estimates (in the spirit of Triton's own matmul
``early_config_prune``): they only throw out configs that clearly cannot compile or clearly
spill; anything that still fails to compile is skipped by the tuner when it is timed.

Nothing here imports torch (the CLI reads configs from the cache without it); a dtype is
given as a short name ("bf16", "fp16", "fp32", "fp8e4m3") or a ``torch.dtype``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

from fusepass.kernels.limits import padded_head_dim, value_tile_dim

# Bytes per element of each dtype short name.
DTYPE_BYTES = {"fp8e4m3": 1, "fp8e5m2": 1, "fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}

_DTYPE_ALIASES = {
    "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32", "float": "fp32", "f32": "fp32",
    "float64": "fp64", "double": "fp64",
    "float8_e4m3fn": "fp8e4m3", "float8_e4m3fnuz": "fp8e4m3", "fp8": "fp8e4m3",
    "float8_e5m2": "fp8e5m2", "float8_e5m2fnuz": "fp8e5m2",
}


def dtype_name(dtype: Any) -> str:
    """Short name for a torch dtype or a dtype spelling: torch.bfloat16, "bfloat16", "bf16" -> "bf16"."""
    text = str(dtype).lower().removeprefix("torch.")
    text = _DTYPE_ALIASES.get(text, text)
    if text not in DTYPE_BYTES:
        raise ValueError(f"fusepass: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return text


class _Knobs:
    """What both config types share: a dict form (the cache file's) and a short text form."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Inverse of :meth:`as_dict`; unknown or missing fields, or non-integers, raise ValueError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown, missing = set(data) - set(names), set(names) - set(data)
        if unknown or missing:
            raise ValueError(f"fusepass: {cls.__name__} fields: unknown {sorted(unknown)}, missing {sorted(missing)}")
        for name in names:
            raw = data[name]
            if not isinstance(raw, int) or isinstance(raw, bool):
                raise ValueError(f"fusepass: {cls.__name__} field {name}={raw!r} is not an int")
        return cls(**{name: int(data[name]) for name in names})


@dataclasses.dataclass(frozen=True)
class ForwardConfig(_Knobs):
    """A forward launch: each program owns BLOCK_M query rows and steps over the keys."""

    BLOCK_M: int  # query rows per program
    BLOCK_N: int  # keys per inner-loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the key loop

    @property
    def query_tile(self) -> int:
        return self.BLOCK_M

    @property
    def key_tile(self) -> int:
        return self.BLOCK_N

    def short(self) -> str:
        """Compact form for tables and log lines: ``128x64 w4 s3``."""
        return f"{self.BLOCK_M}x{self.BLOCK_N} w{self.num_warps} s{self.num_stages}"


@dataclasses.dataclass(frozen=True)
class BackwardConfig(_Knobs):
    """A backward launch: the dK/dV program owns BLOCK_OWN keys and steps over the queries
    BLOCK_STEP at a time; the dQ program owns BLOCK_OWN queries and steps over the keys."""

    BLOCK_OWN: int  # rows a program owns (keys for dK/dV, queries for dQ)
    BLOCK_STEP: int  # rows per inner-loop step (queries for dK/dV, keys for dQ)
    num_warps: int
    num_stages: int

    # Tiles of the dK/dV kernel (the dQ kernel's are the transpose).
    @property
    def query_tile(self) -> int:
        return self.BLOCK_STEP

    @property
    def key_tile(self) -> int:
        return self.BLOCK_OWN

    def short(self) -> str:
        """Compact form: ``own 128 step 64 w8 s2``."""
        return f"own {self.BLOCK_OWN} step {self.BLOCK_STEP} w{self.num_warps} s{self.num_stages}"


@dataclasses.dataclass(frozen=True)
class DecodeConfig(_Knobs):
    """A decode launch (kernels/decode.py): the packed query rows against BLOCK_N keys per
    step, the keys split over num_splits programs per (batch, key/value head)."""

    BLOCK_N: int
    num_splits: int
    num_warps: int
    num_stages: int

    def short(self) -> str:
        return f"N{self.BLOCK_N} x{self.num_splits} splits w{self.num_warps} s{self.num_stages}"


LaunchConfig = Union[ForwardConfig, BackwardConfig]


def config_type(direction: str) -> type:
    if direction == "fwd":
        return ForwardConfig
    if direction == "bwd":
        return BackwardConfig
    raise ValueError(f"fusepass: direction must be 'fwd' or 'bwd', got {direction!r}")


def config_from_dict(data: Mapping[str, Any]) -> LaunchConfig:
    """A config from its dict form, its type told by its fields."""
    cls = BackwardConfig if "BLOCK_OWN" in data else ForwardConfig
    return cls.from_dict(data)


@dataclasses.dataclass(frozen=True)
class Arch:
    """The limits of one GPU architecture that decide which configs can run."""

    name: str  # "sm80", "sm86", "sm89", "sm90", ...
    major: int
    minor: int
    shared_memory_bytes: int  # per block, opt-in maximum
    max_registers_per_thread: int = 255

    @property
    def is_hopper(self) -> bool:
        return self.major == 9


# Opt-in shared memory per block from the CUDA programming guide's compute capability table.
_SMEM_BY_CAPABILITY = {
    (8, 0): 163 * 1024,  # A100
    (8, 6): 99 * 1024,  # RTX 30xx, A10, A40
    (8, 7): 163 * 1024,  # Orin
    (8, 9): 99 * 1024,  # RTX 40xx, L4, L40
    (9, 0): 227 * 1024,  # H100, H200
}
_SMEM_FALLBACK = 99 * 1024  # the smallest of the sm80-class parts: safe for an unknown one


def arch_for(capability: tuple[int, int], shared_memory_bytes: int | None = None) -> Arch:
    """Arch for a compute capability; ``shared_memory_bytes`` (the device's real opt-in limit,
    e.g. ``torch.cuda.get_device_properties(d).shared_memory_per_block_optin``) wins when given."""
    major, minor = int(capability[0]), int(capability[1])
    smem = shared_memory_bytes or _SMEM_BY_CAPABILITY.get((major, minor), _SMEM_FALLBACK)
    return Arch(
        name=f"sm{major}{minor}",
        major=major,
        minor=minor,
        shared_memory_bytes=int(smem),
    )


# Registers a thread needs besides the tiles (addresses, loop state, softmax statistics).
# NOTE: an estimate, not a measurement; it only decides which configs are not even timed.
_REGISTER_OVERHEAD = 32


def shared_memory_bytes(cfg: LaunchConfig, head_dim: int, dtype: Any, *, value_head_dim: int | None = None) -> int:
    """Estimated shared memory of one program.

    fwd: the Q tile once, K and V tiles once per pipeline stage.
    bwd: the key-block kernel keeps its K and V tiles and pipelines Q and dO tiles over the
    query loop (the dQ kernel is the mirror image and needs no more).
    Head dims are padded as the kernels pad them (``kernels/limits.py``).
    """
    elt = DTYPE_BYTES[dtype_name(dtype)]
    d, dv = padded_head_dim(head_dim), value_tile_dim(head_dim, value_head_dim or head_dim)
    stages = max(1, cfg.num_stages)
    if isinstance(cfg, ForwardConfig):
        return elt * (cfg.BLOCK_M * d + stages * cfg.BLOCK_N * (d + dv))
    return elt * (cfg.BLOCK_OWN * (d + dv) + stages * cfg.BLOCK_STEP * (d + dv))


def registers_per_thread(cfg: LaunchConfig, head_dim: int, *, value_head_dim: int | None = None) -> int:
    """Estimated live fp32 registers per thread.

    fwd: the output accumulator [BLOCK_M, Dv] and the score tile [BLOCK_M, BLOCK_N].
    bwd: the dK, dV accumulators [BLOCK_N, D + Dv] and two score-sized tiles (P and dP).
    """
    d, dv = padded_head_dim(head_dim), value_tile_dim(head_dim, value_head_dim or head_dim)
    threads = 32 * cfg.num_warps
    if isinstance(cfg, ForwardConfig):
        live = cfg.BLOCK_M * dv + cfg.BLOCK_M * cfg.BLOCK_N
    else:
        live = cfg.BLOCK_OWN * (d + dv) + 2 * cfg.BLOCK_STEP * cfg.BLOCK_OWN
    return -(-live // threads) + _REGISTER_OVERHEAD


def fits_shared_memory(cfg: LaunchConfig, arch: Arch, head_dim: int, dtype: Any, *,
                       value_head_dim: int | None = None) -> bool:
    """Does the config's shared memory estimate fit the architecture's per-block limit?"""
    need = shared_memory_bytes(cfg, head_dim, dtype, value_head_dim=value_head_dim)
    return need <= arch.shared_memory_bytes


def fits_registers(cfg: LaunchConfig, arch: Arch, head_dim: int, dtype: Any = None, *,
                   value_head_dim: int | None = None) -> bool:
    """Does the config keep its tiles in registers without spilling (by estimate)?

    ``dtype`` is accepted for a uniform predicate signature: accumulators are fp32 whatever it is.
    """
    need = registers_per_thread(cfg, head_dim, value_head_dim=value_head_dim)
    return need <= arch.max_registers_per_thread


PRUNING_PREDICATES = (fits_shared_memory, fits_registers)


def why_pruned(cfg: LaunchConfig, arch: Arch, head_dim: int, dtype: Any, *, value_head_dim: int | None = None) -> str:
    """"" when the config survives pruning, else the name of the first predicate it fails."""
    for predicate in PRUNING_PREDICATES:
        if not predicate(cfg, arch, head_dim, dtype, value_head_dim=value_head_dim):
            return predicate.__name__
    return ""
