"""Kernel launch configurations: the knobs the autotuner searches over, and what prunes them.

A :class:`KernelConfig` is what a launcher needs besides the tensors.  The pruning predicates
below are deliberately simple, named estimates (in the spirit of Triton's own matmul
``early_config_prune``): they only throw out configs that clearly cannot compile or clearly
spill; anything that still fails to compile is skipped by the tuner when it is timed.

Nothing here imports torch (the CLI reads configs from the cache without it); a dtype is
given as a short name ("bf16", "fp16", "fp32", "fp8e4m3") or a ``torch.dtype``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

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


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int  # query rows per program
    BLOCK_N: int  # key columns per inner-loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the key loop
    # Hopper (sm90) template knobs; the FA2 template ignores them.  New knobs get a default so
    # that configs written before they existed still read back.
    warp_specialize: bool = False  # producer/consumer warp specialization of the key loop

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KernelConfig":
        """Inverse of :meth:`as_dict`; unknown or missing required fields raise ValueError."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"fusepass: unknown KernelConfig fields {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name, field in names.items():
            if name not in data:
                if field.default is dataclasses.MISSING:
                    raise ValueError(f"fusepass: KernelConfig field {name!r} missing")
                continue
            raw = data[name]
            want = bool if field.default is not dataclasses.MISSING and isinstance(field.default, bool) else int
            if not isinstance(raw, (int, bool)) or (want is int and isinstance(raw, bool)):
                raise ValueError(f"fusepass: KernelConfig field {name}={raw!r} is not an {want.__name__}")
            values[name] = want(raw)
        return cls(**values)

    def short(self) -> str:
        """Compact form for tables and log lines: ``128x64 w4 s3`` (+ ``ws`` when specialized)."""
        text = f"{self.BLOCK_M}x{self.BLOCK_N} w{self.num_warps} s{self.num_stages}"
        return text + (" ws" if self.warp_specialize else "")


@dataclasses.dataclass(frozen=True)
class Arch:
    """The limits of one GPU architecture that decide which configs can run."""

    name: str  # "sm80", "sm86", "sm89", "sm90", ...
    major: int
    minor: int
    shared_memory_bytes: int  # per block, opt-in maximum
    max_registers_per_thread: int = 255
    has_warp_specialization: bool = False

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
        has_warp_specialization=major == 9,
    )


# Registers a thread needs besides the tiles (addresses, loop state, softmax statistics).
# NOTE: an estimate, not a measurement; it only decides which configs are not even timed.
_REGISTER_OVERHEAD = 32


def shared_memory_bytes(cfg: KernelConfig, head_dim: int, dtype: Any, *, value_head_dim: int | None = None,
                        direction: str = "fwd") -> int:
    """Estimated shared memory of one program.

    fwd: the Q tile once, K and V tiles once per pipeline stage.
    bwd: the key-block kernel keeps its K and V tiles and pipelines Q and dO tiles over the
    query loop (the dQ kernel is the mirror image and needs no more).
    Head dims are padded as the kernels pad them (``kernels/limits.py``).
    """
    elt = DTYPE_BYTES[dtype_name(dtype)]
    d, dv = padded_head_dim(head_dim), value_tile_dim(head_dim, value_head_dim or head_dim)
    stages = max(1, cfg.num_stages)
    if direction == "fwd":
        return elt * (cfg.BLOCK_M * d + stages * cfg.BLOCK_N * (d + dv))
    if direction == "bwd":
        return elt * (cfg.BLOCK_N * (d + dv) + stages * cfg.BLOCK_M * (d + dv))
    raise ValueError(f"fusepass: direction must be 'fwd' or 'bwd', got {direction!r}")


def registers_per_thread(cfg: KernelConfig, head_dim: int, *, value_head_dim: int | None = None,
                         direction: str = "fwd") -> int:
    """Estimated live fp32 registers per thread.

    fwd: the output accumulator [BLOCK_M, Dv] and the score tile [BLOCK_M, BLOCK_N].
    bwd: the dK, dV accumulators [BLOCK_N, D + Dv] and two score-sized tiles (P and dP).
    """
    d, dv = padded_head_dim(head_dim), value_tile_dim(head_dim, value_head_dim or head_dim)
    threads = 32 * cfg.num_warps
    if direction == "fwd":
        live = cfg.BLOCK_M * dv + cfg.BLOCK_M * cfg.BLOCK_N
    elif direction == "bwd":
        live = cfg.BLOCK_N * (d + dv) + 2 * cfg.BLOCK_M * cfg.BLOCK_N
    else:
        raise ValueError(f"fusepass: direction must be 'fwd' or 'bwd', got {direction!r}")
    return -(-live // threads) + _REGISTER_OVERHEAD


def fits_shared_memory(cfg: KernelConfig, arch: Arch, head_dim: int, dtype: Any, *,
                       value_head_dim: int | None = None, direction: str = "fwd") -> bool:
    """Does the config's shared memory estimate fit the architecture's per-block limit?"""
    need = shared_memory_bytes(cfg, head_dim, dtype, value_head_dim=value_head_dim, direction=direction)
    return need <= arch.shared_memory_bytes


def fits_registers(cfg: KernelConfig, arch: Arch, head_dim: int, dtype: Any = None, *,
                   value_head_dim: int | None = None, direction: str = "fwd") -> bool:
    """Does the config keep its tiles in registers without spilling (by estimate)?

    ``dtype`` is accepted for a uniform predicate signature: accumulators are fp32 whatever it is.
    """
    need = registers_per_thread(cfg, head_dim, value_head_dim=value_head_dim, direction=direction)
    return need <= arch.max_registers_per_thread


def fits_arch(cfg: KernelConfig, arch: Arch) -> bool:
    """Knobs the architecture does not have (warp specialization before Hopper) rule a config out."""
    return arch.has_warp_specialization or not cfg.warp_specialize


PRUNING_PREDICATES = (fits_shared_memory, fits_registers)


def why_pruned(cfg: KernelConfig, arch: Arch, head_dim: int, dtype: Any, *, value_head_dim: int | None = None,
               direction: str = "fwd") -> str:
    """"" when the config survives pruning, else the name of the first predicate it fails."""
    if not fits_arch(cfg, arch):
        return "fits_arch"
    for predicate in PRUNING_PREDICATES:
        if not predicate(cfg, arch, head_dim, dtype, value_head_dim=value_head_dim, direction=direction):
            return predicate.__name__
    return ""
