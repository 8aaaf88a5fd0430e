"""TuneKey: bucketing, the stable string form, versions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autotune_util import make_key
from fusepass.autotune.key import BUCKET_FLOOR, TuneKey, bucket, current_versions


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 37, 64, 65, 129, 1000, 1024, 1025, 4095, 4096, 4097, 100_000])
def test_bucket_is_next_power_of_two_with_floor(n):
    b = bucket(n)
    assert b >= max(n, BUCKET_FLOOR)
    assert b & (b - 1) == 0, "bucket must be a power of two"
    assert b == BUCKET_FLOOR or b // 2 < n, "bucket must be the smallest power of two >= n"


def test_lengths_in_one_bucket_share_a_key_and_others_do_not():
    assert make_key(seq_q=513, seq_k=700) == make_key(seq_q=1024, seq_k=1000)
    assert make_key(seq_q=1, seq_k=3) == make_key(seq_q=BUCKET_FLOOR, seq_k=BUCKET_FLOOR)
    assert make_key(seq_q=1024) != make_key(seq_q=1025)
    assert make_key(seq_k=1024) != make_key(seq_k=1025)


def test_negative_length_is_an_error():
    with pytest.raises(ValueError):
        bucket(-1)


@pytest.mark.parametrize("change", [
    dict(gpu="NVIDIA A100-SXM4-80GB"), dict(capability=(8, 0)), dict(template_hash="tpl1"),
    dict(dtype="fp16"), dict(head_dim=64), dict(value_head_dim=64), dict(features=""),
    dict(gqa_group=4), dict(direction="bwd"), dict(torch_version="0.0"), dict(triton_version="0.0"),
])
def test_every_field_separates_keys(change):
    assert make_key(**change) != make_key()
    assert make_key(**change).to_string() != make_key().to_string()


def test_string_round_trip_with_awkward_values():
    key = make_key(gpu="GPU; with=odd %chars", features="pred=j<=i;a0=3", dtype=torch.float16)
    text = key.to_string()
    assert text.count(";") == len(dataclasses.fields(TuneKey))  # separators inside values are escaped
    assert TuneKey.from_string(text) == key
    assert key.dtype == "fp16"


def test_string_form_is_stable():
    key = TuneKey(gpu="NVIDIA H200", capability="9.0", torch_version="2.13.0", triton_version="3.9.0",
                  template_hash="abc", dtype="bf16", head_dim=128, value_head_dim=128, features="causal",
                  gqa_group=2, m_bucket=1024, n_bucket=2048, direction="bwd")
    # The cache file stores this text: changing it orphans every user's cache.
    assert key.to_string() == ("k1;gpu=NVIDIA H200;cc=9.0;torch=2.13.0;triton=3.9.0;tpl=abc;dtype=bf16;d=128;"
                               "dv=128;feat=causal;g=2;m=1024;n=2048;dir=bwd")
    assert len(key.short_id()) == 10 and key.short_id() == TuneKey.from_string(key.to_string()).short_id()


@pytest.mark.parametrize("bad", ["", "k0;gpu=x", "k1;gpu=x", "k1;zzz=1", make_key().to_string().replace("d=128", "d=x")])
def test_malformed_strings_are_rejected(bad):
    with pytest.raises(ValueError):
        TuneKey.from_string(bad)


@pytest.mark.parametrize("bad", [dict(direction="sideways"), dict(head_dim=0), dict(gqa_group=-1), dict(dtype="int8")])
def test_invalid_fields_are_rejected(bad):
    with pytest.raises(ValueError):
        make_key(**bad)


def test_build_fills_in_current_versions():
    key = make_key()
    assert (key.torch_version, key.triton_version) == current_versions()
    assert key.torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert key.is_current()
    assert not make_key(torch_version="1.0").is_current()
    assert not key.is_current(template_hashes={"other"})
