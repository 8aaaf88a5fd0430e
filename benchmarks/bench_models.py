"""Unmodified ``transformers`` models: eager, torch.compile (Inductor), SDPA + Inductor, fusepass.

The six-model table of ``../shared/GPU.md`` in one run: B=4, S=2048, 4 layers, inference, bf16,
random weights from configs (nothing downloaded).  Per model, four columns, each the median of
``triton.testing.do_bench`` after warm-up (compile included in the warm-up, not in the time):

- ``eager``: ``attn_implementation="eager"`` (attention written as ordinary code);
- ``inductor``: ``torch.compile(model)`` of that eager-attention model;
- ``sdpa+inductor``: the same weights with ``attn_implementation="sdpa"``, ``torch.compile``d
  (if that compile fails, SDPA without compile, marked "no compile");
- ``fusepass``: ``torch.compile(model, backend="fusepass")`` of the eager-attention model.

Checks in the same run: fusepass's ``last_hidden_state`` against eager's (relative norm of the
difference), and against a float64 run of the same weights, by the tests' rule: fusepass's max
error at most 4x eager's own bf16 error (+ 1e-2); and how many attention layers fusepass fused
(``counters["fusepass"]["attention_fused"]``) against the number the config has.

    PYTHONPATH=$PWD python benchmarks/bench_models.py [--models llama,gpt2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
import traceback

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fusepass  # noqa: F401  (registers the backend)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _decoder(cls, args, hidden=2048, **extra):
    heads, kv_heads = args.heads, args.kv_heads
    return cls(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        vocab_size=32000, max_position_embeddings=max(4096, args.seq), attention_dropout=0.0,
        attn_implementation="eager", **extra,
    )


def build(name: str, args):
    """(model with eager attention, its config description, input builder, attention layers)."""
    import transformers as tf

    h, nh, kv = args.hidden, args.heads, args.kv_heads
    if name == "llama":
        cfg = _decoder(tf.LlamaConfig, args, hidden=h)
        return tf.LlamaModel(cfg), f"hidden {h}, GQA {nh}/{kv}, D {h // nh}", _ids, cfg.num_hidden_layers
    if name == "mistral":
        cfg = _decoder(tf.MistralConfig, args, hidden=h, sliding_window=args.window)
        return tf.MistralModel(cfg), f"hidden {h}, GQA {nh}/{kv}, D {h // nh}, window {args.window}", _ids, \
            cfg.num_hidden_layers
    if name == "gemma2":
        cfg = _decoder(tf.Gemma2Config, args, hidden=h, sliding_window=2 * args.window,
                       query_pre_attn_scalar=h // nh, attn_logit_softcapping=50.0)
        kinds = "/".join(sorted(set(cfg.layer_types)))
        return tf.Gemma2Model(cfg), (f"hidden {h}, GQA {nh}/{kv}, D {h // nh}, softcap 50, window {2 * args.window} "
                                     f"({kinds} alternating)"), _ids, cfg.num_hidden_layers
    hs = args.small_hidden
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=hs, n_layer=args.layers, n_head=nh, n_positions=max(2048, args.seq),
                            vocab_size=32000, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_implementation="eager")
        return tf.GPT2Model(cfg), f"hidden {hs}, {nh} heads, D {hs // nh}, causal", _ids, cfg.n_layer
    if name == "bert":
        cfg = tf.BertConfig(hidden_size=hs, num_hidden_layers=args.layers, num_attention_heads=nh,
                            intermediate_size=4 * hs, vocab_size=32000, max_position_embeddings=max(2048, args.seq),
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            attn_implementation="eager")
        return tf.BertModel(cfg, add_pooling_layer=False), \
            f"hidden {hs}, {nh} heads, D {hs // nh}, padding mask (last sequence 3/4 valid)", _ids_padded, \
            cfg.num_hidden_layers
    if name == "vit":
        if not hasattr(tf, "ViTModel"):
            return None
        cfg = tf.ViTConfig(hidden_size=hs, num_hidden_layers=args.layers, num_attention_heads=nh,
                           intermediate_size=4 * hs, image_size=args.image, patch_size=8,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           attn_implementation="eager")
        tokens = (args.image // 8) ** 2 + 1
        return tf.ViTModel(cfg, add_pooling_layer=False), \
            f"hidden {hs}, {nh} heads, D {hs // nh}, {args.image}px patch 8 ({tokens} tokens)", _pixels, \
            cfg.num_hidden_layers
    raise SystemExit(f"unknown model {name!r}")


def _ids(model, args, device):
    return {"input_ids": torch.randint(1, model.config.vocab_size, (args.batch, args.seq), device=device)}


def _ids_padded(model, args, device):
    inputs = _ids(model, args, device)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long, device=device)
    mask[-1, (3 * args.seq) // 4:] = 0
    inputs["attention_mask"] = mask
    return inputs


def _pixels(model, args, device):
    return {"pixel_values": torch.randn(args.batch, 3, args.image, args.image, device=device)}


def _cast(inputs, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def time_ms(fn, device: str, warmup_calls: int = 3) -> float:
    """Median milliseconds of ``fn()``: do_bench (CUDA events) on the GPU, a host clock on CPU."""
    for _ in range(warmup_calls):
        fn()
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median"))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sdpa_twin(eager_model, name: str, row: dict):
    """The same weights with ``attn_implementation="sdpa"``.  transformers refuses SDPA for
    models whose attention has a logit softcap (Gemma2); then the twin runs without the softcap
    (a different, cheaper function: a lower bound for SDPA), and the row says so."""
    kwargs = {"add_pooling_layer": False} if name in ("bert", "vit") else {}
    cfg = copy.deepcopy(eager_model.config)
    cfg._attn_implementation = "sdpa"
    try:
        twin = type(eager_model)(cfg, **kwargs)
    except ValueError as e:
        if not getattr(cfg, "attn_logit_softcapping", None):
            row["sdpa_note"] = f"transformers refuses SDPA: {str(e).splitlines()[0][:160]}"
            return None
        # Build it eager, without the softcap, then switch the attention function to SDPA
        # (looked up per call from the config).
        cfg._attn_implementation = "eager"
        cfg.attn_logit_softcapping = None
        twin = type(eager_model)(cfg, **kwargs)
        twin.config._attn_implementation = "sdpa"
        row["sdpa_note"] = "softcap off: transformers refuses SDPA with a logit softcap"
    twin = twin.to(eager_model.device, eager_model.dtype).eval()
    twin.load_state_dict(eager_model.state_dict())
    return twin


def run_model(name: str, args) -> dict | None:
    device, dtype = args.device, DTYPES[args.dtype]
    built = build(name, args)
    if built is None:
        return None
    torch.manual_seed(0)
    base, desc, make_inputs, layers = built
    base.eval()
    eager_model = base.to(device, dtype)
    inputs = make_inputs(eager_model, args, device)
    row = {"model": name, "config": desc, "attention_layers": layers}

    def runner(model, cast=dtype):
        feed = _cast(inputs, cast)

        def fn():
            with torch.no_grad():
                return model(**feed).last_hidden_state
        return fn

    outs = {}

    def measure(col, make):
        torch._dynamo.reset()
        counters.clear()
        try:
            fn = make()
            outs[col] = fn().detach().clone()  # first call: compiles
            row[col] = time_ms(fn, device)
        except Exception as e:  # report, keep going with the other columns
            traceback.print_exc()
            row[col] = None
            row[col + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            return False
        return True

    measure("eager", lambda: runner(eager_model))
    measure("inductor", lambda: runner(torch.compile(copy.deepcopy(eager_model))))

    sdpa_model = _sdpa_twin(eager_model, name, row)
    if sdpa_model is None:
        row["sdpa_inductor"] = None
    else:
        row["sdpa_compiled"] = measure("sdpa_inductor", lambda: runner(torch.compile(sdpa_model)))
        if not row["sdpa_compiled"]:
            measure("sdpa_inductor", lambda: runner(sdpa_model))
        del sdpa_model

    ok = measure("fusepass", lambda: runner(torch.compile(copy.deepcopy(eager_model), backend="fusepass")))
    row["fused"] = counters["fusepass"]["attention_fused"] if ok else None
    row["rejected"] = counters["fusepass"]["attention_rejected"] if ok else None
    torch._dynamo.reset()

    if "fusepass" in outs and "eager" in outs:
        fp, eg = outs["fusepass"].double(), outs["eager"].double()
        row["rel_vs_eager"] = ((fp - eg).norm() / eg.norm()).item()
        # float64 reference of the same weights and inputs: fusepass's error vs eager's own.
        ref_model = copy.deepcopy(eager_model).double()
        with torch.no_grad():
            ref = ref_model(**_cast(inputs, torch.float64)).last_hidden_state
        del ref_model
        err_fp = (fp - ref).abs().max().item()
        err_eager = (eg - ref).abs().max().item()
        floor = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
        row["err_fusepass_fp64"], row["err_eager_fp64"] = err_fp, err_eager
        row["matches"] = bool(err_fp <= 4 * err_eager + floor) and bool(torch.isfinite(fp).all())
        if "sdpa_inductor" in outs and "sdpa_note" not in row:
            sd = outs["sdpa_inductor"].double()
            row["err_sdpa_fp64"] = (sd - ref).abs().max().item()
        del ref
    del eager_model, outs
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows) -> str:
    lines = [
        "| model | eager | torch.compile (inductor) | SDPA + inductor | fusepass | speedup vs inductor | "
        "fused / layers | fusepass vs eager (rel) | max err vs fp64: fusepass / eager / SDPA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sdpa = "-" if r.get("sdpa_inductor") is None else (
            _fmt(r["sdpa_inductor"]) + ("" if r.get("sdpa_compiled") else " (no compile)")
            + (" (softcap off)" if "softcap off" in r.get("sdpa_note", "") else ""))
        speed = (f"{r['inductor'] / r['fusepass']:.2f}x" if r.get("inductor") and r.get("fusepass") else "-")
        fused = "-" if r.get("fused") is None else f"{r['fused']} / {r['attention_layers']}" + (
            f" ({r['rejected']} rejected)" if r.get("rejected") else "")
        check = "-"
        if "err_fusepass_fp64" in r:
            sdpa_err = r.get("err_sdpa_fp64")
            check = (f"{r['err_fusepass_fp64']:.2e} / {r['err_eager_fp64']:.2e} / "
                     f"{'-' if sdpa_err is None else format(sdpa_err, '.2e')}"
                     f"{'' if r['matches'] else ' MISMATCH'}")
        rel = "-" if "rel_vs_eager" not in r else f"{r['rel_vs_eager']:.1e}"
        lines.append(f"| {r['model']} | {_fmt(r.get('eager'))} | {_fmt(r.get('inductor'))} | {sdpa} | "
                     f"{_fmt(r.get('fusepass'))} | {speed} | {fused} | {rel} | {check} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama,mistral,gemma2,gpt2,bert,vit")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048, help="Llama, Mistral, Gemma2")
    p.add_argument("--small-hidden", type=int, default=1024, help="GPT-2, BERT, ViT")
    p.add_argument("--heads", type=int, default=16, help="attention heads of every model")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads of Llama, Mistral, Gemma2 (GQA)")
    p.add_argument("--window", type=int, default=512, help="Mistral's sliding window (Gemma2: twice this)")
    p.add_argument("--image", type=int, default=512, help="ViT image size (patch 8)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    import transformers
    import triton

    header = (f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
              f"triton {triton.__version__}, transformers {transformers.__version__}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"B={args.batch}, S={args.seq}, {args.layers} layers, {args.dtype}, inference, ms (median)")
    print(header, flush=True)
    rows = []
    for name in args.models.split(","):
        t0 = time.time()
        row = run_model(name, args)
        if row is None:
            print(f"{name}: not available in this transformers, skipped", flush=True)
            continue
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=1)
    print()
    print(header)
    print()
    print(table(rows))
    print()
    for r in rows:
        print(f"- {r['model']}: {r['config']}")
    bad = [r["model"] for r in rows if not r.get("matches") or r.get("fused") != r["attention_layers"]]
    if bad:
        print(f"\nNOT all fused or not matching eager: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
