"""ForwardConfig / BackwardConfig, the pruning predicates and the search spaces."""

from __future__ import annotations

import pytest

from fusepass.autotune.config import (
    BackwardConfig, ForwardConfig, arch_for, config_from_dict, config_type, dtype_name, fits_registers, fits_shared_memory, registers_per_thread,
    shared_memory_bytes, why_pruned,
)
from fusepass.autotune.space import SM80_SPACE, candidates, space_for, with_default

SM80, SM86, SM90 = arch_for((8, 0)), arch_for((8, 6)), arch_for((9, 0))


def test_config_dict_round_trip_and_the_type_told_by_its_fields():
    fwd = ForwardConfig(128, 64, 8, 3)
    bwd = BackwardConfig(BLOCK_OWN=128, BLOCK_STEP=64, num_warps=8, num_stages=2)
    for cfg in (fwd, bwd):
        assert config_from_dict(cfg.as_dict()) == cfg and type(config_from_dict(cfg.as_dict())) is type(cfg)
    assert config_type("fwd") is ForwardConfig and config_type("bwd") is BackwardConfig
    assert bwd.key_tile == 128 and bwd.query_tile == 64 and fwd.query_tile == 128
    assert ForwardConfig.from_dict({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}) == ForwardConfig(64, 32, 4, 2)
    for bad in ({"BLOCK_M": 64}, {**fwd.as_dict(), "bogus": 1}, {**fwd.as_dict(), "BLOCK_M": "64"},
                {**fwd.as_dict(), "num_warps": True}):
        with pytest.raises(ValueError):
            ForwardConfig.from_dict(bad)
    with pytest.raises(ValueError):
        BackwardConfig.from_dict(fwd.as_dict())


def test_dtype_names():
    import torch

    assert dtype_name(torch.bfloat16) == dtype_name("bfloat16") == "bf16"
    assert dtype_name(torch.float8_e4m3fn) == "fp8e4m3"
    with pytest.raises(ValueError):
        dtype_name("int8")


def test_shared_memory_grows_with_tiles_stages_and_dtype():
    small, big = ForwardConfig(64, 64, 4, 2), ForwardConfig(128, 128, 4, 4)
    assert shared_memory_bytes(big, 128, "bf16") > shared_memory_bytes(small, 128, "bf16")
    assert shared_memory_bytes(small, 128, "fp32") == 2 * shared_memory_bytes(small, 128, "bf16")
    # head dims are padded to a power of two
    assert shared_memory_bytes(small, 80, "bf16") == shared_memory_bytes(small, 128, "bf16")


def test_shared_memory_predicate_depends_on_arch():
    cfg = ForwardConfig(128, 128, 8, 3)  # 16 KiB Q + 3 x 64 KiB K/V at d=128 bf16: 208 KiB
    assert fits_shared_memory(cfg, SM90, 128, "bf16")
    assert not fits_shared_memory(cfg, SM80, 128, "bf16")
    assert not fits_shared_memory(cfg, SM86, 128, "bf16")
    assert arch_for((9, 0), shared_memory_bytes=1024).shared_memory_bytes == 1024


def test_register_predicate():
    assert fits_registers(ForwardConfig(128, 64, 4, 2), SM80, 128)
    assert not fits_registers(ForwardConfig(128, 128, 4, 2), SM80, 128)  # 256 fp32 per thread + overhead
    assert fits_registers(ForwardConfig(128, 128, 8, 2), SM80, 128)
    assert registers_per_thread(BackwardConfig(64, 64, 4, 2), 128) > registers_per_thread(ForwardConfig(64, 64, 4, 2), 128)


@pytest.mark.parametrize("arch", [SM80, SM86, SM90], ids=lambda a: a.name)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_candidates_are_pruned_and_never_empty(arch, dtype, head_dim, direction):
    got = candidates(arch, head_dim, dtype, direction=direction, m_bucket=2048, n_bucket=2048)
    assert got, "a search space must keep at least one config"
    assert all(isinstance(c, config_type(direction)) for c in got)
    grid = space_for(arch).grid(direction)
    assert len(got) <= len(grid)
    fitting = [c for c in grid if not why_pruned(c, arch, head_dim, dtype)]
    if fitting:
        assert set(got) <= set(fitting), "a config that fails a pruning predicate was kept"
        dropped = [c for c in fitting if c not in got]
        assert all(min(c.query_tile, c.key_tile) < 64 for c in dropped), "a fitting full-size tile was dropped"
    else:  # nothing fits by estimate: the single smallest config is left for timing to decide
        assert len(got) == 1


def test_spaces_differ_per_arch():
    assert set(space_for(SM90).num_stages) != set(space_for(SM80).num_stages)


def test_backward_estimates_read_the_owned_tile_as_keys():
    # dK/dV keeps BLOCK_OWN keys of K and V, and pipelines BLOCK_STEP query rows of Q and dO.
    cfg = BackwardConfig(BLOCK_OWN=128, BLOCK_STEP=32, num_warps=8, num_stages=2)
    assert shared_memory_bytes(cfg, 64, "bf16") == 2 * (128 * 128 + 2 * 32 * 128)


def test_short_sequences_get_short_tiles():
    got = candidates(SM90, 64, "bf16", m_bucket=16, n_bucket=32)
    assert got and all(c.BLOCK_M == 16 and c.BLOCK_N <= 32 for c in got)
    long = candidates(SM90, 64, "bf16", m_bucket=8192, n_bucket=8192)
    assert min(c.BLOCK_M for c in long) >= 64


def test_with_default_puts_the_default_first_once():
    cands = SM80_SPACE.grid()[:5]
    default = cands[3]
    out = with_default(cands, default)
    assert out[0] == default and out.count(default) == 1 and len(out) == 5
    assert with_default(cands, ForwardConfig(16, 16, 1, 1))[0] == ForwardConfig(16, 16, 1, 1)
