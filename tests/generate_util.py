"""Helpers for the ``generate()`` tests (``test_generate.py``): tiny causal LMs, left-padded
prompts, a backend that logs what each compiled graph was, and the logits rule.

Everything here runs on any device; the CPU tests and the GPU tests share it, so the GPU-only
criteria (the bf16 logits rule) are exercised on CPU too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from conftest import assert_close_to_reference

PAD = 0  # pad_token_id; prompts draw their real tokens from [1, vocab)
SOFTMAX_FUNCTIONS = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One model size and one generation setting."""

    hidden: int
    heads: int
    kv_heads: int  # < heads: GQA (Llama, Qwen2, Mistral); GPT-2 has no GQA and ignores it
    layers: int
    vocab: int
    prompt_len: int  # tokens per row of the batch, padding included
    pad_len: int  # leading padding of the second row (the first row is not padded)
    new_tokens: int
    window: int  # Mistral's sliding window: below prompt_len + new_tokens, so that it cuts keys off
    # The configs' default initializer_range (0.02) makes attention nearly uniform and the
    # logits nearly tied (see test_models.INIT_RANGE); with 0.2 at hidden 64 the logits spread
    # over a few units.  Measured (Llama, fp32, 32 greedy choices): the smallest top-2 gap was
    # 2e-3, the fused and the eager logit errors against float64 6e-6.
    init_range: float

    def __post_init__(self):
        assert self.window < self.prompt_len + self.new_tokens, "the window would not matter"
        assert 0 < self.pad_len < self.prompt_len


MODELS = ("llama", "qwen2", "mistral", "gpt2")


def build_causal_lm(name: str, sizes: Sizes, *, windowed: bool = True) -> torch.nn.Module:
    """A randomly initialized causal LM with eager attention, in eval mode (nothing downloaded).

    No eos token: every row generates exactly ``sizes.new_tokens`` tokens.  Mistral gets
    ``sizes.window`` as its sliding window (``windowed=False``: none, to show that it matters).
    """
    import transformers

    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=sizes.hidden, n_layer=sizes.layers, n_head=sizes.heads, n_positions=256, vocab_size=sizes.vocab,
            bos_token_id=1, eos_token_id=None, pad_token_id=PAD, initializer_range=sizes.init_range,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="eager",
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v biases, GQA
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[name]
    extra = {}
    if name == "mistral":
        extra["sliding_window"] = sizes.window if windowed else None
    cfg = config_cls(
        hidden_size=sizes.hidden, num_hidden_layers=sizes.layers, intermediate_size=2 * sizes.hidden,
        vocab_size=sizes.vocab, max_position_embeddings=256, num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads, attention_dropout=0.0, initializer_range=sizes.init_range,
        bos_token_id=1, eos_token_id=None, pad_token_id=PAD, attn_implementation="eager", **extra,
    )
    return model_cls(cfg).eval()


def left_padded_prompts(sizes: Sizes, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two prompts, tokenizer-free: row 0 has ``prompt_len`` tokens, row 1 is
    left-padded with ``pad_len`` pad tokens (attention_mask 0 there)."""
    g = torch.Generator().manual_seed(seed)
    # input_ids, attention_mask: [2, P]
    input_ids = torch.randint(1, sizes.vocab, (2, sizes.prompt_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, : sizes.pad_len] = PAD
    attention_mask[1, : sizes.pad_len] = 0
    return input_ids.to(device), attention_mask.to(device)


def generation_config(sizes: Sizes, cache: str):
    """Greedy decoding of exactly ``new_tokens`` tokens with per-step logits returned.

    ``cache``: "dynamic" (transformers' default DynamicCache) or "static" (StaticCache).
    ``disable_compile``: with a static cache on CUDA, generate() would otherwise compile the
    decode steps itself (Inductor, CUDA graphs): the eager run would not be eager, and ours
    would be wrapped in a second compile.
    """
    import transformers

    assert cache in ("dynamic", "static"), cache
    return transformers.GenerationConfig(
        do_sample=False, max_new_tokens=sizes.new_tokens,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
        cache_implementation="static" if cache == "static" else None, disable_compile=True,
        return_dict_in_generate=True, output_logits=True,
    )


@dataclasses.dataclass(frozen=True)
class Generation:
    sequences: torch.Tensor  # [B, P + T]: prompt and generated tokens
    logits: torch.Tensor  # [B, T, V] float32: the logits each generated token was chosen from


def generate(model, input_ids, attention_mask, sizes: Sizes, cache: str) -> Generation:
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config(sizes, cache)
        )
    assert out.sequences.shape == (2, sizes.prompt_len + sizes.new_tokens), tuple(out.sequences.shape)
    return Generation(out.sequences, torch.stack(out.logits, dim=1))


def teacher_forced_logits(model, gen: Generation, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logits ``model`` (a module or its forward) gives for each generated token's prefix,
    in one forward over the whole sequence (no cache): [B, T, V] in the model's dtype, step by
    step what ``gen.logits`` would be had ``model`` generated ``gen.sequences``.

    Position ids as generate() makes them from the mask (``cumsum - 1``, 0 at padding).
    """
    seq = gen.sequences
    prompt_len = attention_mask.shape[1]
    new = seq.shape[1] - prompt_len
    mask = torch.cat([attention_mask, attention_mask.new_ones(seq.shape[0], new)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    # The logits at position t choose token t + 1.
    return logits[:, prompt_len - 1 : prompt_len - 1 + new]


def unpadded_logits(model, gen: Generation, attention_mask: torch.Tensor) -> torch.Tensor:
    """Like ``teacher_forced_logits``, but each row alone with its padding removed: what the
    padded batch computes exactly (left padding only hides keys), without ever forming a fully
    masked query row.

    The float64 reference needs this: transformers' eager mask is ``finfo(float64).min``, which
    Llama-style ``softmax(..., dtype=torch.float32)`` rounds to -inf, so a padded query row is
    NaN, and through the next layer's values so is every position of that batch row.
    """
    prompt_len = attention_mask.shape[1]
    new = gen.sequences.shape[1] - prompt_len
    rows = []
    for row in range(gen.sequences.shape[0]):
        seq = gen.sequences[row, prompt_len - int(attention_mask[row].sum()):][None]  # [1, L]: no padding
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits[0]
        rows.append(logits[seq.shape[1] - 1 - new : seq.shape[1] - 1])
    return torch.stack(rows)


def assert_logits_follow_the_rule(got: Generation, eager_model, reference_model, attention_mask, name: str):
    """The compiled run, judged on its own token trajectory: at every step its logits are
    within ``assert_close_to_reference``'s rule of the float64 model's logits for the same
    prefix, the yardstick being the eager model (same dtype, same padded batch) on that prefix.

    ``eager_model``, ``reference_model``: modules or forward methods (eager: the model's own
    uncompiled forward; reference: a float64 copy).
    """
    eager = teacher_forced_logits(eager_model, got, attention_mask)
    reference = unpadded_logits(reference_model, got, attention_mask)
    # generate() hands out float32 copies of the model's logits: back to the model's dtype
    # (exact), so that the rule's floor is the one of that dtype.
    logits = got.logits.to(eager.dtype)
    for step in range(logits.shape[1]):
        assert_close_to_reference(
            logits[:, step], eager[:, step], reference[:, step], name=f"{name}: logits of generated token {step}"
        )


@dataclasses.dataclass(frozen=True)
class CompiledGraph:
    """What one graph handed to the backend contained, and what fusepass made of it."""

    scores: tuple  # one (M, N) per softmax in the Dynamo graph (ints, or str for a symbolic size)
    fused: int  # attention_fused added while compiling this graph
    rejected: int  # attention_rejected added

    @property
    def query_lengths(self) -> set:
        return {m for m, _ in self.scores}


def _size(s) -> Any:
    return s if isinstance(s, int) else str(s)


def softmax_scores(gm: fx.GraphModule) -> tuple:
    """(M, N) of every softmax over [.., M, N] scores in a Dynamo graph, before any rewrite."""
    out = []
    for n in gm.graph.nodes:
        is_softmax = (n.op == "call_function" and n.target in SOFTMAX_FUNCTIONS) or (
            n.op == "call_method" and n.target == "softmax"
        )
        ev = n.meta.get("example_value")
        if is_softmax and isinstance(ev, torch.Tensor) and ev.dim() >= 2:
            out.append((_size(ev.shape[-2]), _size(ev.shape[-1])))
    return tuple(out)


class GraphLog:
    """A backend that is ``backend_name`` (looked up in Dynamo's registry, as
    ``torch.compile(backend="fusepass")`` does) and logs one ``CompiledGraph`` per compile.

    ``torch.compile(fn, backend=GraphLog("fusepass"), options=...)`` passes ``options`` here
    exactly as it passes them to ``"fusepass"``; they go on unchanged.
    """

    def __init__(self, backend_name: str = "fusepass"):
        from torch._dynamo.backends.registry import lookup_backend

        self.backend = lookup_backend(backend_name)
        self.graphs: list[CompiledGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs, **kwargs):
        scores = softmax_scores(gm)
        fused, rejected = counters["fusepass"]["attention_fused"], counters["fusepass"]["attention_rejected"]
        compiled = self.backend(gm, example_inputs, **kwargs)
        self.graphs.append(CompiledGraph(
            scores,
            counters["fusepass"]["attention_fused"] - fused,
            counters["fusepass"]["attention_rejected"] - rejected,
        ))
        return compiled


class ForwardCalls:
    """Records the query length (``input_ids.shape[1]``) of every call of ``model``'s forward,
    through a forward pre-hook (it runs in ``Module.__call__``, outside anything compiled)."""

    def __init__(self, model: torch.nn.Module):
        self.query_lengths: list[int] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.query_lengths.append(ids.shape[1])

    def remove(self):
        self._handle.remove()
