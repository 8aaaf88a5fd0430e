"""End to end: eight unmodified ``transformers`` models, inference and a training step, four ways.

The proof table of issue 12.  Models (random weights from configs, nothing downloaded; the
builders of ``bench_models.py``, plus T5 and Whisper here): Llama (GQA), Mistral (sliding
window), Gemma2 (logit softcap, alternating sliding/full layers), GPT-2, BERT (padding mask),
T5 (learned position bias, with its gradient; padding mask; encoder-decoder), ViT and Whisper
(encoder-decoder).  Variants, each with the same weights:

- ``eager``: ``attn_implementation="eager"`` (attention written as ordinary code);
- ``inductor``: ``torch.compile`` of that eager-attention model;
- ``sdpa_inductor``: ``attn_implementation="sdpa"``, ``torch.compile``d (transformers refuses SDPA
  with a logit softcap: Gemma2's twin then runs without it, a cheaper function, marked
  "softcap off"; if its compile fails, SDPA uncompiled, marked "no compile");
- ``fusepass``: ``torch.compile(model, backend="fusepass")`` of the eager-attention model.

Per model and variant:

1. inference: eval, ``no_grad``, ``last_hidden_state`` (and the encoder's for T5 / Whisper);
   milliseconds, median of ``triton.testing.do_bench`` on CUDA, of 5 host-clock calls on CPU,
   after warm-up calls (compile included in the warm-up, not in the time);
2. a training step: train mode with every dropout probability 0 (deterministic), gradients set
   to None, forward, loss, backward.  The loss is a fixed random projection of the outputs,
   ``sum_k <out_k, W_k>`` (W drawn in float64 on the CPU, the same numbers for every dtype;
   outputs upcast to float32 first so that the loss itself is not rounded to bf16);
3. peak memory of each: ``torch.cuda.max_memory_allocated`` over one more call after the timing
   (the peak statistics reset just before; only that variant's model is on the GPU then, so
   the peak is its weights, gradients, activations and workspace, plus the inputs and the
   loss's weights that all variants share), GiB; None on CPU;
4. first-call seconds (``torch.compile`` + the first inference call, and separately + the first
   training step), each in a fresh process with empty Inductor and Triton caches
   (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``), after one eager call that warms CUDA
   and cuBLAS up: inductor, sdpa_inductor, fusepass with an empty autotune cache
   (``FUSEPASS_CACHE_DIR``, fresh per mode) and fusepass again with the cache that run filled
   (autotuning is on by default on CUDA, ``FUSEPASS_AUTOTUNE=0`` in the environment or
   ``--no-autotune`` turns it off).  Slow: ``--no-compile-times`` skips it,
   ``--only-compile-times`` does only this;
5. fusepass's fused and rejected attention sites (``counters["fusepass"]``) against the
   attention layers the config has, for the inference and the training compile;
6. correctness, once per model: fusepass's inference outputs, the per-token terms of its
   training loss and the gradient of one attention parameter (T5: the position bias table)
   against eager's, by the tests' rule (``tests/conftest.py``): fusepass's max error against a
   float64 run of the same weights at most 4x eager's own error + a floor (1e-2 bf16, 1e-3
   fp16, 1e-5 fp32).  NOTE: the rule is applied to the loss's per-token terms, not to the
   scalar: a single number's two rounding errors are two draws, and
   P(|X| > 4|Y|) = 2/pi * atan(1/4) = 16% for independent Gaussians, a coin the check would
   toss.  The scalar losses are reported beside it.  The float64 run goes one batch element
   at a time (the loss is a sum over the batch, so losses add and gradients accumulate), so
   that its eager attention (ViT: 4097 tokens, [1, 16, N, N] float64 scores per layer) needs a
   batch's worth less memory.

Output: one JSON line per variant while it runs; then a Markdown table, one row per model
(speed-ups of fusepass over SDPA + Inductor, peak-memory ratios, first-call times), printed and
appended to ``--markdown FILE``; raw rows, one per model and variant, appended to ``--csv``
(date, GPU, versions, command line); PNG charts in ``--charts DIR`` if matplotlib is importable.
A variant that fails is reported in its row (``error``) and the run goes on.  ``--table-from
CSV`` renders the table and charts from the latest run of each model in a CSV (for a table
made by several commands) without measuring anything.

    PYTHONPATH=$PWD python benchmarks/bench_e2e.py [--models llama,t5] [--markdown out.md] [--charts DIR]
    PYTHONPATH=$PWD python benchmarks/bench_e2e.py --tiny --device cpu --dtype fp32 --no-compile-times
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import torch
import torch._dynamo
from torch._dynamo.utils import counters

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # bench_models, and this checkout's fusepass (as PYTHONPATH=$PWD does)

import bench_models  # noqa: E402  (its builders, the SDPA twin, the timer; imports fusepass)
from bench_models import _cast, _ids_padded, _sdpa_twin, time_ms  # noqa: E402
from e2e_report import (  # noqa: E402  (the rows, the CSV, the table and charts)
    MODES, VARIANTS, Row, append_csv, check_csv_header, latest_runs, read_csv, report)

import fusepass  # noqa: E402,F401  (registers the backend)
from fusepass.report import dynamo_fallbacks  # noqa: E402

MODELS = ("llama", "mistral", "gemma2", "gpt2", "bert", "t5", "vit", "whisper")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The tests' floors (tests/conftest.py) for exact-zero errors, and the factor over eager's error.
FLOORS = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}
FACTOR = 4.0
# Sizes: the GPU defaults (bench_models.py's: hidden >= 1024, 2k-token sequences; ViT 512px at
# patch 8 = 4097 tokens) and a CPU smoke preset.  Explicit flags win over the preset.
PRESETS = {
    "default": dict(batch=4, seq=2048, dec_seq=512, layers=4, hidden=2048, small_hidden=1024, heads=16,
                    kv_heads=4, window=512, image=512),
    "tiny": dict(batch=2, seq=64, dec_seq=32, layers=2, hidden=64, small_hidden=64, heads=4, kv_heads=2,
                 window=16, image=64),
}
WHISPER_MELS = 80  # Whisper's own; its conv front end halves the frames: 2 * seq frames -> seq positions
GIB = 2.0 ** 30


# ---------------------------------------------------------------------------------------------
# Models


def _t5_inputs(model, args, device):
    inputs = _ids_padded(model, args, device)  # input_ids [B, S], attention_mask [B, S] (last row 3/4)
    inputs["decoder_input_ids"] = torch.randint(1, model.config.vocab_size, (args.batch, args.dec_seq), device=device)
    return inputs


def _whisper_inputs(model, args, device):
    # input_features: [B, mels, 2 * S]; decoder_input_ids: [B, S_dec]
    return {
        "input_features": torch.randn(args.batch, model.config.num_mel_bins, 2 * args.seq, device=device),
        "decoder_input_ids": torch.randint(1, model.config.vocab_size, (args.batch, args.dec_seq), device=device),
    }


def build(name: str, args):
    """(model with eager attention, its description, input builder, attention layers per forward):
    bench_models.build's models, plus T5 and Whisper (self-attention per encoder layer, self- and
    cross-attention per decoder layer)."""
    import transformers as tf

    hs, nh, layers = args.small_hidden, args.heads, args.layers
    if name == "t5":
        cfg = tf.T5Config(d_model=hs, d_kv=hs // nh, d_ff=4 * hs, num_layers=layers, num_decoder_layers=layers,
                          num_heads=nh, vocab_size=32000, dropout_rate=0.0, decoder_start_token_id=0,
                          pad_token_id=0, attn_implementation="eager")
        desc = (f"hidden {hs}, {nh} heads, D {hs // nh}, learned position bias (trained), padding mask, "
                f"encoder {args.seq} / decoder {args.dec_seq} tokens")
        return tf.T5Model(cfg), desc, _t5_inputs, 3 * layers
    if name == "whisper":
        cfg = tf.WhisperConfig(
            d_model=hs, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=nh,
            decoder_attention_heads=nh, encoder_ffn_dim=4 * hs, decoder_ffn_dim=4 * hs, vocab_size=32000,
            num_mel_bins=WHISPER_MELS, max_source_positions=args.seq, max_target_positions=max(448, args.dec_seq),
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
            decoder_layerdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            attn_implementation="eager")
        desc = (f"hidden {hs}, {nh} heads, D {hs // nh}, encoder {args.seq} positions ({2 * args.seq} frames) / "
                f"decoder {args.dec_seq} tokens (causal + cross)")
        return tf.WhisperModel(cfg), desc, _whisper_inputs, 3 * layers
    return bench_models.build(name, args)


# Parameters whose gradient the correctness check compares (first name containing one, in order).
GRAD_PARAMS = {"t5": ("relative_attention_bias",)}
DEFAULT_GRAD_PARAMS = ("q_proj.weight", "query.weight", "c_attn.weight", "SelfAttention.q.weight")


def grad_param_name(name: str, module: torch.nn.Module) -> str:
    names = [n for n, _ in module.named_parameters()]
    for key in GRAD_PARAMS.get(name, DEFAULT_GRAD_PARAMS):
        for n in names:
            if key in n:
                return n
    return names[0]


def outputs(result) -> dict[str, torch.Tensor]:
    """The model's hidden states: the decoder's and, for encoder-decoders, the encoder's."""
    outs = {"last_hidden_state": result.last_hidden_state}
    enc = getattr(result, "encoder_last_hidden_state", None)
    if enc is not None:
        outs["encoder_last_hidden_state"] = enc
    return outs


class Projection:
    """The training loss, ``sum_k <out_k, W_k>``, as per-token terms (``terms``; the loss is their
    sum).  W_k: [B, T_k, H] drawn in float64 on the CPU from seed k, the full batch's, so a run on
    batch rows ``start:start + b`` (the float64 reference) uses the same numbers as the full one.
    Low-precision outputs are upcast to float32; float64 ones stay."""

    def __init__(self, batch: int, device: str) -> None:
        self.batch, self.device = batch, device
        self._weights: dict[tuple, torch.Tensor] = {}

    def _weight(self, seed: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (seed, shape, dtype)
        if key not in self._weights:
            g = torch.Generator().manual_seed(1234 + seed)
            self._weights[key] = torch.randn(shape, generator=g, dtype=torch.float64).to(self.device, dtype)
        return self._weights[key]

    def terms(self, outs: dict[str, torch.Tensor], start: int = 0) -> torch.Tensor:
        """[b, sum_k T_k]: sum over the hidden dim of out * W, outputs in name order."""
        parts = []
        for seed, name in enumerate(sorted(outs)):
            o = outs[name]  # [b, T, H]
            acc = torch.float64 if o.dtype == torch.float64 else torch.float32
            w = self._weight(seed, (self.batch,) + tuple(o.shape[1:]), acc)[start:start + o.shape[0]]
            parts.append((o.to(acc) * w).sum(-1))
        return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------
# Correctness


@dataclasses.dataclass(frozen=True)
class Check:
    ok: bool
    err: float  # max |fusepass - fp64|
    eager_err: float  # max |eager - fp64|
    bound: float  # FACTOR * eager_err + floor


def check_close(actual: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Check:
    """tests/conftest.py's ``assert_close_to_reference`` as a value: NaNs where the reference has
    them and nowhere else; eager's own error measured where it is not NaN."""
    a, e, r = actual.double().cpu(), eager.double().cpu(), ref.double().cpu()
    finite = ~torch.isnan(r)
    same_nans = bool(torch.isnan(a).eq(~finite).all())
    err = (a - r)[finite].abs().max().item() if finite.any() else 0.0
    both = finite & ~torch.isnan(e)
    eager_err = (e - r)[both].abs().max().item() if both.any() else 0.0
    bound = FACTOR * eager_err + FLOORS[dtype]
    return Check(same_nans and math.isfinite(err) and err <= bound, err, eager_err, bound)


def reference_fp64(base_cpu, inputs, projection: Projection, grad_name: str, device: str):
    """Float64 run of the same weights, one batch row at a time: inference outputs (eval, no
    grad), then the training step's per-token loss terms and ``grad_name``'s gradient."""
    model = copy.deepcopy(base_cpu).to(device, torch.float64)
    feed = _cast(inputs, torch.float64)
    batch = next(iter(feed.values())).shape[0]
    rows = [{k: v[b:b + 1] for k, v in feed.items()} for b in range(batch)]
    model.eval()
    with torch.no_grad():
        per_row = [{k: v.cpu() for k, v in outputs(model(**row)).items()} for row in rows]
    outs = {k: torch.cat([p[k] for p in per_row]) for k in per_row[0]}
    model.train()
    model.zero_grad(set_to_none=True)
    terms = []
    for b, row in enumerate(rows):
        t = projection.terms(outputs(model(**row)), start=b)
        t.sum().backward()
        terms.append(t.detach().cpu())
    grad = dict(model.named_parameters())[grad_name].grad.detach().cpu()
    del model
    return outs, torch.cat(terms), grad


# ---------------------------------------------------------------------------------------------
# Measuring in this process


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peak_gib(fn: Callable, device: str) -> Optional[float]:
    """Peak allocated GiB over one call of ``fn`` (None off CUDA)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def fusepass_options(args) -> dict:
    opts = {}
    if args.compiler != "inductor":
        opts["inner"] = args.compiler
    if args.no_autotune:
        opts["autotune"] = False
    return opts


def compile_variant(variant: str, module: torch.nn.Module, args):
    if variant == "eager":
        return module
    if variant == "fusepass":
        return torch.compile(module, backend="fusepass", options=fusepass_options(args))
    return torch.compile(module, backend=args.compiler)


def step_fns(model, module: torch.nn.Module, feed: dict, projection: Projection):
    """(inference call, training step) of ``model`` (``module``: the nn.Module under it)."""

    def infer():
        with torch.no_grad():
            return outputs(model(**feed))

    def train(capture: Optional[dict] = None):
        module.zero_grad(set_to_none=True)
        terms = projection.terms(outputs(model(**feed)))
        loss = terms.sum()
        loss.backward()
        if capture is not None:
            capture["terms"], capture["loss"] = terms.detach().cpu(), loss.item()
        return loss.detach()

    return infer, train


class ModelRun:
    """One model: its CPU master weights (in the run's dtype), inputs on the device, the loss."""

    def __init__(self, name: str, args) -> None:
        self.name, self.args = name, args
        self.device, self.dtype = args.device, DTYPES[args.dtype]
        torch.manual_seed(0)
        base, self.desc, make_inputs, self.layers = build(name, args)
        self.base = base.to(self.dtype).eval()  # stays on the CPU; each variant gets its own copy
        torch.manual_seed(1)
        inputs = make_inputs(self.base, args, self.device)
        self.inputs = inputs  # float inputs in float32: cast per model dtype
        self.feed = _cast(inputs, self.dtype)
        self.projection = Projection(args.batch, self.device)
        self.grad_name = grad_param_name(name, self.base)
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.base.parameters()) / GIB
        self.refused: set[str] = set()  # variants transformers would not build (SDPA)

    def sdpa_twin(self, row: Optional[Row] = None) -> Optional[torch.nn.Module]:
        """bench_models' SDPA twin of the weights, on the CPU; None where transformers refuses
        SDPA (``row.note`` says why, and so does its softcap-off stand-in's)."""
        notes: dict = {}
        twin = _sdpa_twin(self.base, self.name, notes)
        if row is not None and notes.get("sdpa_note"):
            row.add_note(notes["sdpa_note"])
        if twin is None:
            self.refused.add("sdpa_inductor")
        return twin

    def module(self, variant: str, row: Optional[Row] = None) -> Optional[torch.nn.Module]:
        """A fresh copy of the weights on the device: the eager-attention model, or (sdpa_inductor)
        its SDPA twin, None if refused."""
        m = self.sdpa_twin(row) if variant == "sdpa_inductor" else copy.deepcopy(self.base)
        return None if m is None else m.to(self.device)


def measure_variant(run: ModelRun, variant: str, row: Row, captured: dict) -> None:
    """Both modes of one variant into ``row``; eager's and fusepass's first results into ``captured``."""
    device = run.device
    for mode in MODES:
        torch._dynamo.reset()
        counters.clear()
        module = model = infer = train = None
        try:
            module = run.module(variant, row)
            if module is None:
                return
            module.train(mode == "train")
            model = compile_variant(variant, module, run.args)

            def first():
                """The first call (it compiles), keeping what the correctness check needs."""
                infer, train = step_fns(model, module, run.feed, run.projection)
                if mode == "infer":
                    outs = infer()
                    if variant in ("eager", "fusepass"):
                        captured[(variant, "outs")] = {k: v.detach().cpu() for k, v in outs.items()}
                else:
                    cap: dict = {}
                    train(cap)
                    grad = dict(module.named_parameters())[run.grad_name].grad
                    cap["grad"] = None if grad is None else grad.detach().cpu()
                    if variant in ("eager", "fusepass"):
                        captured[(variant, "train")] = cap
                return infer, train

            try:
                infer, train = first()
            except Exception:
                if variant != "sdpa_inductor":
                    raise
                # bench_models.py's rule: SDPA uncompiled where its compile fails.
                traceback.print_exc()
                row.add_note("no compile: torch.compile of the SDPA model failed, SDPA uncompiled")
                torch._dynamo.reset()
                model = module
                infer, train = first()
            if variant == "fusepass":
                setattr(row, f"fused_{mode}", int(counters["fusepass"]["attention_fused"]))
                setattr(row, f"rejected_{mode}", int(counters["fusepass"]["attention_rejected"]))
            if variant != "eager":
                frames, reasons = dynamo_fallbacks()
                row.eager_frames = (row.eager_frames or 0) + frames
                if frames:
                    row.add_note(f"{mode}: Dynamo ran {frames} frame(s) eagerly: " + "; ".join(list(reasons)[:2]))
            fn = infer if mode == "infer" else train
            setattr(row, f"{mode}_ms", round(time_ms(fn, device), 4))
            peak = peak_gib(fn, device)
            setattr(row, f"{mode}_peak_gib", None if peak is None else round(peak, 3))
        except Exception as e:  # report, go on with the next mode / variant
            traceback.print_exc()
            row.add_error(mode, e)
        finally:
            # Nothing of this mode may stay on the device: the next one's peak would count it.
            del module, model, infer, train
            fn = None
            torch._dynamo.reset()
            _free(device)


def check_correctness(run: ModelRun, row: Row, captured: dict) -> None:
    """fusepass against eager by the float64 rule (see the module docstring) into ``row``."""
    need = [("eager", "outs"), ("fusepass", "outs"), ("eager", "train"), ("fusepass", "train")]
    missing = [f"{v} {what}" for v, what in need if (v, what) not in captured]
    if missing:
        row.add_note("correctness not checked: no " + ", ".join(missing))
        return
    try:
        ref_outs, ref_terms, ref_grad = reference_fp64(run.base, run.inputs, run.projection, run.grad_name,
                                                       run.device)
    except Exception as e:
        traceback.print_exc()
        row.add_error("float64 reference", e)
        return
    finally:
        _free(run.device)
    checks = []
    worst = None
    for key in ref_outs:
        c = check_close(captured[("fusepass", "outs")][key], captured[("eager", "outs")][key], ref_outs[key],
                        run.dtype)
        checks.append(c)
        if worst is None or c.err / c.bound > worst.err / worst.bound:
            worst = c
    row.out_err, row.out_eager_err = worst.err, worst.eager_err
    fp, eg = captured[("fusepass", "train")], captured[("eager", "train")]
    c = check_close(fp["terms"], eg["terms"], ref_terms, run.dtype)
    checks.append(c)
    row.loss_terms_err, row.loss_terms_eager_err = c.err, c.eager_err
    row.loss, row.loss_eager, row.loss_fp64 = fp["loss"], eg["loss"], ref_terms.sum().item()
    row.grad_param = run.grad_name
    if fp["grad"] is None or eg["grad"] is None or ref_grad is None:
        row.add_note(f"no gradient for {run.grad_name}")
        checks.append(Check(False, math.nan, math.nan, math.nan))
    else:
        c = check_close(fp["grad"], eg["grad"], ref_grad, run.dtype)
        checks.append(c)
        row.grad_err, row.grad_eager_err = c.err, c.eager_err
    row.correct = all(c.ok for c in checks)


# ---------------------------------------------------------------------------------------------
# First-call times, each in a fresh process


def _size_argv(args) -> list[str]:
    argv = []
    for key in PRESETS["default"]:
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--dtype", args.dtype, "--device", args.device, "--compiler", args.compiler]
    return argv + (["--no-autotune"] if args.no_autotune else [])


def first_call(name: str, variant: str, mode: str, args) -> dict:
    """In a fresh process (``--first-call``): seconds of torch.compile + the first call of
    ``mode``, after one uncompiled call; the fused count and (fusepass) the tuning it did."""
    run = ModelRun(name, args)
    device = run.device
    module = run.module(variant)
    if module is None:
        return {"error": "transformers refuses SDPA for this model"}
    module.train(mode == "train")
    warm_infer, warm_train = step_fns(module, module, run.feed, run.projection)
    (warm_infer if mode == "infer" else warm_train)()  # CUDA context, cuBLAS, autograd: not compile time
    _sync(device)
    t0 = time.perf_counter()
    model = compile_variant(variant, module, args)
    infer, train = step_fns(model, module, run.feed, run.projection)
    fn = infer if mode == "infer" else train
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    fn()
    _sync(device)
    res = {"first_s": round(first, 2), "second_s": round(time.perf_counter() - t1, 3),
           "fused": int(counters["fusepass"]["attention_fused"])}
    if variant == "fusepass" and device == "cuda":
        from fusepass.autotune.tuner import default_tuner

        tuner = default_tuner()
        res["tuned_keys"] = tuner.tuned_count
        res["tuning_s"] = round(sum(e.tuning_seconds for e in tuner.cache.entries().values()), 2) \
            if tuner.tuned_count else 0.0
    return res


def compile_times(name: str, row_of: dict[str, Row], args, skip=()) -> None:
    """inductor, sdpa_inductor, fusepass cold and warm, for each mode: fresh processes with empty
    Inductor and Triton caches; the fusepass tuning cache fresh per mode, kept from cold to warm."""
    runs = (("inductor", "first_{m}_s"), ("sdpa_inductor", "first_{m}_s"), ("fusepass", "first_{m}_s"),
            ("fusepass", "first_{m}_warm_s"))
    for mode in MODES:
        tune_dir = tempfile.mkdtemp(prefix="fusepass-e2e-tune-")
        try:
            for variant, field in runs:
                row = row_of.get(variant)
                if row is None or variant in skip:
                    continue
                scratch = tempfile.mkdtemp(prefix="fusepass-e2e-")
                env = {**os.environ, "FUSEPASS_CACHE_DIR": tune_dir,
                       "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor"),
                       "TRITON_CACHE_DIR": os.path.join(scratch, "triton"),
                       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
                cmd = [sys.executable, os.path.abspath(__file__), "--first-call", f"{variant}:{mode}",
                       "--models", name, *_size_argv(args)]
                label = f"first call {mode}" + (" (warm)" if "warm" in field else "")
                try:
                    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
                    sys.stderr.write("".join(line + "\n" for line in r.stderr.splitlines() if "[fusepass]" in line))
                    lines = r.stdout.strip().splitlines()
                    if r.returncode != 0 or not lines:
                        sys.stderr.write(f"# {name} {variant} {label} failed:\n{r.stderr[-3000:]}\n")
                        raise RuntimeError(f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
                    res = json.loads(lines[-1])
                    if "error" in res:
                        raise RuntimeError(res["error"])
                    setattr(row, field.format(m=mode), res["first_s"])
                    if variant == "fusepass" and "warm" not in field:
                        setattr(row, f"tuned_keys_{mode}", res.get("tuned_keys"))
                        setattr(row, f"tuning_{mode}_s", res.get("tuning_s"))
                        if getattr(row, f"fused_{mode}") is None:  # --only-compile-times: the child's count
                            setattr(row, f"fused_{mode}", res["fused"])
                    print(f"# {name} {variant} {label}: {res}", flush=True)
                except Exception as e:  # noqa: BLE001  (a timeout, a crash: report and go on)
                    row.add_error(label, e)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        finally:
            shutil.rmtree(tune_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# One model, the whole run


def run_model(name: str, args, meta: dict) -> list[Row]:
    t0 = time.time()
    try:
        run = ModelRun(name, args)
    except Exception as e:
        traceback.print_exc()
        row = Row(**meta, model=name, config="", variant="-", dtype=args.dtype, batch=args.batch, seq=args.seq,
                  dec_seq=args.dec_seq, layers=args.layers, attention_layers=0, compiler=args.compiler)
        row.add_error("build", e)
        return [row]
    row_of = {}
    for variant in args.variants:
        row_of[variant] = Row(**meta, model=name, config=run.desc, variant=variant, dtype=args.dtype,
                              batch=args.batch, seq=args.seq, dec_seq=args.dec_seq, layers=args.layers,
                              attention_layers=run.layers, compiler=args.compiler,
                              weights_gib=round(run.weights_gib, 3))
    if "fusepass" in row_of:
        from fusepass.autotune import provider

        row_of["fusepass"].autotune = bool(args.device == "cuda" and not args.no_autotune
                                           and provider.autotune_enabled())
    if not args.only_compile_times:
        captured: dict = {}
        for variant, row in row_of.items():
            t_variant = time.time()
            measure_variant(run, variant, row, captured)
            row.seconds = round(time.time() - t_variant, 1)
            print(json.dumps({k: v for k, v in dataclasses.asdict(row).items() if v not in (None, "")
                              and k not in meta}), flush=True)
        if "fusepass" in row_of:
            check_correctness(run, row_of["fusepass"], captured)
            if args.explain:
                torch._dynamo.reset()
                print(fusepass.explain(run.module("fusepass").eval(), options=fusepass_options(args), **run.feed))
        del captured
    if not args.no_compile_times:
        _free(args.device)
        if "sdpa_inductor" in row_of and args.only_compile_times:
            run.sdpa_twin(row_of["sdpa_inductor"])  # refused or softcap off: in the row's note
        compile_times(name, row_of, args, skip=run.refused)
    del run
    torch._dynamo.reset()
    _free(args.device)
    print(f"# {name}: {time.time() - t0:.0f} s", flush=True)
    return list(row_of.values())


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (default: all four)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke sizes: " +
                   ", ".join(f"{k} {v}" for k, v in PRESETS["tiny"].items()))
    defaults = PRESETS["default"]
    p.add_argument("--batch", type=int, help=f"default {defaults['batch']}")
    p.add_argument("--seq", type=int, help=f"sequence length; T5's and Whisper's encoder (default {defaults['seq']})")
    p.add_argument("--dec-seq", type=int, help=f"T5's and Whisper's decoder length (default {defaults['dec_seq']})")
    p.add_argument("--layers", type=int, help=f"layers (per stack for T5 / Whisper; default {defaults['layers']})")
    p.add_argument("--hidden", type=int, help=f"Llama, Mistral, Gemma2 (default {defaults['hidden']})")
    p.add_argument("--small-hidden", type=int,
                   help=f"GPT-2, BERT, T5, ViT, Whisper (default {defaults['small_hidden']})")
    p.add_argument("--heads", type=int, help=f"attention heads (default {defaults['heads']})")
    p.add_argument("--kv-heads", type=int, help=f"key/value heads of the GQA decoders (default {defaults['kv_heads']})")
    p.add_argument("--window", type=int,
                   help=f"Mistral's sliding window, Gemma2's twice this (default {defaults['window']})")
    p.add_argument("--image", type=int, help=f"ViT image size, patch 8 (default {defaults['image']})")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compiler", default="inductor",
                   help="backend of the inductor / sdpa_inductor variants and fusepass's inner compiler")
    p.add_argument("--no-autotune", action="store_true", help="fusepass option autotune=False (heuristic configs)")
    p.add_argument("--no-compile-times", action="store_true", help="skip the first-call measurements (slow)")
    p.add_argument("--only-compile-times", action="store_true",
                   help="only the first-call measurements (its rows merge with a --no-compile-times run's in "
                        "--table-from)")
    p.add_argument("--child-timeout", type=float, default=1200.0, help="seconds per first-call process")
    p.add_argument("--explain", action="store_true", help="print fusepass.explain's table per model")
    p.add_argument("--csv", default=os.path.join(HERE, "e2e.csv"), help="raw rows are appended here ('' = none)")
    p.add_argument("--markdown", help="append the table here")
    p.add_argument("--charts", help="write PNG charts into this folder (needs matplotlib)")
    p.add_argument("--table-from", metavar="CSV", help="measure nothing: table and charts from a CSV's latest runs")
    p.add_argument("--first-call", metavar="VARIANT:MODE", help=argparse.SUPPRESS)  # the child of compile_times
    args = p.parse_args(argv)
    for key, value in PRESETS["tiny" if args.tiny else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in VARIANTS if v in args.variants.split(",")]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.first_call:
        variant, mode = args.first_call.split(":")
        print(json.dumps(first_call(args.models[0], variant, mode, args)), flush=True)
        return 0
    if args.table_from:
        rows = latest_runs(read_csv(args.table_from))
        if not rows:
            raise SystemExit(f"{args.table_from}: no rows")
        report(rows, args)
        return 0
    if args.csv:
        check_csv_header(args.csv)

    import transformers
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(run=now.strftime("%Y-%m-%dT%H:%M:%S"), date=now.strftime("%Y-%m-%d %H:%M UTC"),
                device=torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu"),
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                command="python benchmarks/bench_e2e.py " + shlex.join(argv))
    print(f"# {meta}", flush=True)
    rows: list[Row] = []
    for name in args.models:
        model_rows = run_model(name, args, meta)
        rows += model_rows
        if args.csv:
            append_csv(args.csv, model_rows)  # per model: a later crash keeps what was measured
    report(rows, args)
    bad = [r.model for r in rows if r.error] + [
        r.model for r in rows if r.variant == "fusepass"
        and (r.fused_infer != r.attention_layers or r.fused_train != r.attention_layers
             or (not args.only_compile_times and r.correct is not True))]
    if bad:
        print(f"\nfailing, NOT all fused, or not matching eager: {', '.join(dict.fromkeys(bad))}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
