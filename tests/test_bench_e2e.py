"""CPU smoke run of ``benchmarks/bench_e2e.py`` (the end-to-end benchmark of issue 12).

Its main function at the ``--tiny`` sizes on two models (Llama: GQA, causal; BERT: padding mask),
every variant, no first-call subprocesses, with ``--compiler aot_eager`` (fusepass's inner
compiler and the "inductor" variants' backend) so that it stays well under a minute on two cores:
the point is the script's plumbing (rows, CSV, table, counts, the float64 check), not the
numbers.  On CPU fusepass runs its PyTorch reference.  The GPU run uses Inductor throughout.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_e2e  # noqa: E402
import e2e_report  # noqa: E402

pytestmark = pytest.mark.slow

MODELS = ("llama", "bert")
TINY_LAYERS = bench_e2e.PRESETS["tiny"]["layers"]


def test_tiny_cpu_run_fuses_every_layer_matches_eager_and_writes_rows(tmp_path):
    out_csv, md, md2 = tmp_path / "e2e.csv", tmp_path / "e2e.md", tmp_path / "again.md"
    argv = ["--tiny", "--device", "cpu", "--dtype", "float32", "--models", ",".join(MODELS), "--no-compile-times",
            "--compiler", "aot_eager", "--csv", str(out_csv), "--markdown", str(md), "--charts", str(tmp_path / "png")]
    assert bench_e2e.main(argv) == 0

    with open(out_csv, newline="") as f:
        assert next(csv.reader(f)) == e2e_report.COLUMNS
    rows = e2e_report.read_csv(str(out_csv))
    assert [(r.model, r.variant) for r in rows] == [(m, v) for m in MODELS for v in e2e_report.VARIANTS]
    for r in rows:
        where = f"{r.model}/{r.variant}"
        assert r.error == "", f"{where}: {r.error}"
        assert r.device and r.date and r.torch == torch.__version__ and r.triton and r.transformers, where
        assert "--tiny" in r.command and r.dtype == "float32" and r.layers == TINY_LAYERS, where
        assert r.attention_layers == TINY_LAYERS, where  # one self-attention per layer
        assert r.infer_ms > 0 and r.train_ms > 0, where
        assert r.infer_peak_gib is None and r.train_peak_gib is None, where  # no memory numbers on CPU
        assert r.first_infer_s is None and r.first_train_warm_s is None, where  # --no-compile-times
        assert r.weights_gib > 0, where

    for r in (r for r in rows if r.variant == "fusepass"):
        assert r.fused_infer == r.fused_train == r.attention_layers, r
        assert r.rejected_infer == r.rejected_train == 0, r
        assert r.eager_frames == 0, r.note
        assert r.correct is True, r
        # The numbers behind the boolean, by the tests' rule (float32 floor 1e-5).
        for err, eager in ((r.out_err, r.out_eager_err), (r.loss_terms_err, r.loss_terms_eager_err),
                           (r.grad_err, r.grad_eager_err)):
            assert err <= bench_e2e.FACTOR * eager + 1e-5, r
        assert "attention" in r.grad_param or "attn" in r.grad_param, r.grad_param
        assert math.isclose(r.loss, r.loss_fp64, rel_tol=1e-3, abs_tol=1e-3), r

    text = md.read_text()
    for m in MODELS:
        assert f"\n| {m} | {TINY_LAYERS}/{TINY_LAYERS}, {TINY_LAYERS}/{TINY_LAYERS} |" in text, text
        assert "| yes |" in text.split(f"| {m} |")[1].splitlines()[0]

    # The table again, from the CSV alone.
    assert bench_e2e.main(["--table-from", str(out_csv), "--markdown", str(md2)]) == 0
    assert e2e_report.table(rows) in md2.read_text()


def test_check_close_follows_the_tests_rule():
    ref = torch.zeros(8, dtype=torch.float64)
    eager = ref + 1e-3
    assert bench_e2e.check_close(ref + 4e-3, eager, ref, torch.float32).ok
    assert not bench_e2e.check_close(ref + 5e-3, eager, ref, torch.float32).ok
    nan_where_ref_is_finite = ref.clone()
    nan_where_ref_is_finite[3] = math.nan
    assert not bench_e2e.check_close(nan_where_ref_is_finite, eager, ref, torch.float32).ok


def test_table_from_csv_merges_a_speed_run_and_a_compile_time_run_of_the_same_setup():
    setup = dict(date="d", device="cpu", torch="t", triton="tr", transformers="tf", model="llama", config="c",
                 variant="fusepass", dtype="bf16", batch=4, seq=2048, dec_seq=512, layers=4, attention_layers=4,
                 compiler="inductor")
    speed = e2e_report.Row(run="1", command="a --no-compile-times", infer_ms=2.0, correct=True, **setup)
    times = e2e_report.Row(run="2", command="a --only-compile-times", first_infer_s=9.0, **setup)
    other = e2e_report.Row(run="3", command="b", **dict(setup, model="bert"), infer_ms=1.0)
    (merged, bert) = e2e_report.latest_runs([speed, times, other])
    assert (merged.infer_ms, merged.first_infer_s, merged.correct, merged.run) == (2.0, 9.0, True, "2")
    assert merged.command == "a --no-compile-times && a --only-compile-times"
    assert bert.model == "bert" and bert.first_infer_s is None
    # Another setup (here: sequence length) starts afresh.
    (resized,) = e2e_report.latest_runs([speed, dataclasses.replace(times, seq=4096)])
    assert resized.infer_ms is None and resized.seq == 4096
