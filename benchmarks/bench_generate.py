"""generate() end to end: a transformers Llama-style model with GQA (random weights), greedy.

Columns, each a fresh copy of the same weights:
- ``eager``: eager attention, no compile (the tokens every other column must reproduce);
- ``fusepass``: eager attention, ``model.forward = torch.compile(model.forward, backend="fusepass")``;
- ``inductor``: eager attention, ``torch.compile(model.forward)`` (its attention is not fused);
- ``sdpa``: the model hand-switched to ``attn_implementation="sdpa"``, ``torch.compile(model.forward)``.
With a StaticCache, ``mode="reduce-overhead"`` (CUDA graphs) is a second row per variant.

Tokens/s of the new tokens, median of ``--repeats`` generate() calls after one warm-up call
(compiles excluded; the first call's time is printed), and how many new tokens equal eager's
before the first difference (the fewest over the batch's rows).  In fp32 fusepass's must all
equal eager's (tests/test_generate.py asserts it); in bf16 with random weights every variant
whose arithmetic differs from eager's (Inductor's as much as fusepass's or SDPA's) picks
another token once two logits are within a rounding, and the sequences part there.

    PYTHONPATH=$PWD FUSEPASS_AUTOTUNE=0 python benchmarks/bench_generate.py            # H200 sizes
    PYTHONPATH=$PWD python benchmarks/bench_generate.py --tiny --device cpu             # smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(args, attn: str):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.hidden * 3,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=args.prompt + args.new_tokens + 8, bos_token_id=1, eos_token_id=None,
        pad_token_id=0, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def prompts(args, batch: int, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # one left-padded prompt, as a batch of real prompts has
        ids[1, : args.prompt // 8] = 0
        mask[1, : args.prompt // 8] = 0
    return ids.to(device), mask.to(device)


def generation(args):
    import transformers

    return transformers.GenerationConfig(
        do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
        bos_token_id=1, eos_token_id=None, disable_compile=True,
    )


def stepped(forward):
    """``forward`` under ``mode="reduce-overhead"``: each call starts a new CUDA-graph step (the
    previous step's outputs, already consumed by generate(), may be overwritten)."""
    def step(*a, **kw):
        torch.compiler.cudagraph_mark_step_begin()
        return forward(*a, **kw)

    return step


def static_cache(model, args, batch: int):
    """A StaticCache whose buffers exist before the compiled forward first runs: made inside it,
    they would be CUDA-graph outputs (overwritten by the next replay) without a static address
    (Inductor then skips CUDA graphs for the "mutated inputs")."""
    import transformers

    p = next(model.parameters())
    cache = transformers.StaticCache(config=model.config, max_cache_len=args.prompt + args.new_tokens)
    cache.early_initialization(batch, args.kv_heads, args.hidden // args.heads, p.dtype, p.device)
    return cache


def run(model, ids, mask, gen_cfg, device, cache=None):
    """One greedy generate(); ``cache``: a StaticCache, emptied first (its buffers keep their
    addresses), or None for a DynamicCache."""
    if cache is not None:
        cache.reset()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, past_key_values=cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def agreeing_tokens(got, want, prompt: int) -> int:
    """New tokens equal to eager's before the first difference, the fewest over the rows."""
    differ = (got[:, prompt:] != want[:, prompt:]).int()
    first = torch.where(differ.any(1), differ.argmax(1), torch.full_like(differ[:, 0], differ.shape[1]))
    return int(first.min())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a small model and short prompts (CPU smoke test)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--caches", default="dynamic,static")
    ap.add_argument("--variants", default="fusepass,inductor,sdpa")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="default,reduce-overhead",
                    help="torch.compile modes (reduce-overhead: StaticCache on CUDA only)")
    args = ap.parse_args()
    big = dict(hidden=2048, layers=8, heads=32, kv_heads=8, vocab=32000, prompt=2048, new_tokens=256)
    tiny = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, prompt=16, new_tokens=8)
    for k, v in (tiny if args.tiny else big).items():
        setattr(args, k, v)
    import fusepass  # noqa: F401  (registers the backend)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch._dynamo.config.cache_size_limit = 64
    base = {attn: build(args, attn).to(device, dtype) for attn in ("eager", "sdpa")}
    rows = []
    for batch in map(int, args.batches.split(",")):
        ids, mask = prompts(args, batch, device)
        for cache in args.caches.split(","):
            gen_cfg = generation(args)
            kv = (lambda m: static_cache(m, args, batch)) if cache == "static" else (lambda m: None)
            want = run(base["eager"], ids, mask, gen_cfg, device, kv(base["eager"]))
            modes = [None if m == "default" else m for m in args.modes.split(",")
                     if m == "default" or (cache == "static" and device.type == "cuda")]
            for mode in modes:
                for variant in args.variants.split(","):
                    model = copy.deepcopy(base["sdpa" if variant == "sdpa" else "eager"])
                    kw = {"backend": "fusepass"} if variant == "fusepass" else {}
                    if mode:
                        kw["mode"] = mode
                    torch._dynamo.reset()
                    model.forward = torch.compile(model.forward, **kw)
                    if mode == "reduce-overhead":
                        model.forward = stepped(model.forward)
                    model_cache = kv(model)
                    t0 = time.perf_counter()
                    first = run(model, ids, mask, gen_cfg, device, model_cache)
                    compile_s = time.perf_counter() - t0
                    same = f"{agreeing_tokens(first, want, args.prompt)}/{args.new_tokens}"
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        run(model, ids, mask, gen_cfg, device, model_cache)
                        times.append(time.perf_counter() - t0)
                    cell = f"{batch * args.new_tokens / statistics.median(times):.0f}"
                    rows.append((batch, cache, mode or "default", variant, cell, same, f"{compile_s:.0f}"))
                    print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {args.dtype}, Llama hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads, prompt {args.prompt}, {args.new_tokens} new tokens; tokens/s "
          f"(first call s)\n")
    print("| B | cache | mode | variant | tokens/s | tokens as eager's | first call s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
