"""What a fused training graph saves for backward: no more than the same model written with SDPA.

Issue 12: GPT-2 trained under fusepass peaked well above the SDPA model on the H200.  On CPU
the saved-for-backward tensors differed by one [B, N, hidden] tensor per layer: the op's
``out`` was contiguous [B, H, N, Dv], so ``out.transpose(1, 2).reshape(B, N, H * Dv)`` before the
output projection was a copy, and autograd kept both (``out`` for the op's backward, the copy
for the projection's weight gradient).  SDPA stores its output as [B, N, H, Dv], where that
reshape is a view of the one saved tensor.  The op now does the same (``fusepass.call.out_tensor``).

Saved bytes are summed per storage (views of one storage count once) with
``torch.autograd.graph.saved_tensors_hooks`` around a compiled forward.  Both sides compile with
``aot_eager`` so that only the attention differs; the parameters, which both save alike, are in
both sums.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e2e_util import fused_count, rejected_count
from fusepass.call import out_strides
from fusepass.ops.dispatch import forward_call
from fusepass.ops import attention as op_module, reference

B, N, HIDDEN, HEADS, LAYERS = 2, 64, 64, 4, 2


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """``fn()`` and the bytes of the distinct storages autograd saved while it ran."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


class GPT2StyleAttention(nn.Module):
    """GPT-2's attention block as transformers writes it: one fused qkv projection split in
    three (q, k, v are strided views of it), eager attention with a causal fill, and the output
    transposed back and reshaped into the output projection."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.c_proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (t.view(b, n, HEADS, e // HEADS).transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = torch.matmul(q, k.transpose(-1, -2)) * (e // HEADS) ** -0.5
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
            y = torch.matmul(F.softmax(s, dim=-1), v)
        y = y.transpose(1, 2).reshape(b, n, e).contiguous()
        return x + self.c_proj(y)


class Stack(nn.Module):
    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GPT2StyleAttention(sdpa) for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _compare(eager_model, sdpa_model, make_inputs, layers: int, expected_fused: int):
    fused = torch.compile(eager_model, backend="fusepass", options={"inner": "aot_eager"})
    sdpa = torch.compile(sdpa_model, backend="aot_eager")
    inputs = make_inputs()
    fused_out, fused_bytes = saved_bytes(lambda: fused(**inputs))
    sdpa_out, sdpa_bytes = saved_bytes(lambda: sdpa(**inputs))
    assert fused_count() == expected_fused and rejected_count() == 0
    # The same numbers (a model's output object: its hidden states).
    torch.testing.assert_close(getattr(fused_out, "last_hidden_state", fused_out),
                               getattr(sdpa_out, "last_hidden_state", sdpa_out), rtol=1e-4, atol=1e-4)
    extra = (fused_bytes - sdpa_bytes) / layers
    assert fused_bytes <= sdpa_bytes, (
        f"fusepass saves {fused_bytes} bytes, SDPA {sdpa_bytes}: {extra:.0f} more per layer "
        f"(one [B, N, hidden] fp32 tensor is {B * N * HIDDEN * 4})"
    )


def test_gpt2_style_attention_saves_no_more_than_sdpa():
    torch.manual_seed(0)
    model = Stack(sdpa=False)
    twin = Stack(sdpa=True)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(B, N, HIDDEN, requires_grad=True)
    _compare(model, twin, lambda: {"x": x}, LAYERS, LAYERS)


def test_the_output_is_stored_as_sdpa_stores_it():
    """out [B, H, M, Dv] is laid out [B, M, H, Dv] (``out.transpose(1, 2)`` contiguous), what
    makes the output projection's reshape a view; the reference, the op and its fake agree."""
    q, k, v = (torch.randn(B, 5, HEADS, 16).transpose(1, 2) for _ in range(3))
    feats = (None, 0.25, 0.0, 0.0, float("-inf"), "j <= i", [])
    out, _ = torch.ops.fusepass.attention(q, k, v, [], [], *feats)
    assert out.stride() == out_strides(B, HEADS, 5, 16) and out.transpose(1, 2).is_contiguous()
    ref, _ = reference.attention_forward(forward_call(q, k, v, [], [], *feats))
    assert ref.stride() == out.stride()
    # An empty call (no keys) keeps the layout too.
    empty, _ = torch.ops.fusepass.attention(q, k[:, :, :0], v[:, :, :0], [], [], *feats)
    assert empty.stride() == out.stride()


def test_the_backward_reads_the_projections_gradient_without_a_copy(monkeypatch):
    """The gradient that reaches the op is the projection's, viewed back to [B, H, N, Dv]: it
    has out's strides, and the op's backward takes it as it is."""
    seen = []
    original = torch.ops.fusepass.attention_backward.default

    def spy(grad_out, *args):
        seen.append(grad_out)
        return original(grad_out, *args)

    q, k, v = (torch.randn(B, 7, HEADS, 16).transpose(1, 2).requires_grad_() for _ in range(3))
    feats = (None, 0.25, 0.0, 0.0, float("-inf"), "j <= i", [])
    monkeypatch.setattr(op_module, "attention_backward", spy)
    out, _ = torch.ops.fusepass.attention(q, k, v, [], [], *feats)
    y = out.transpose(1, 2).reshape(B, 7, HEADS * 16)
    assert y.data_ptr() == out.data_ptr() and y._base is not None  # a view: nothing copied for the projection
    (y * torch.randn_like(y)).sum().backward()
    # An expanded gradient (a plain .sum()) is made dense first, as before.
    out, _ = torch.ops.fusepass.attention(q, k, v, [], [], *feats)
    out.sum().backward()
    assert seen[0].stride() == out.stride()
    assert seen[1].is_contiguous()


transformers = pytest.importorskip("transformers")


def _gpt2(impl: str):
    cfg = transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128, vocab_size=128, bos_token_id=0,
        eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False,
        attn_implementation=impl,
    )
    return transformers.GPT2Model(cfg)


def _llama(impl: str):
    cfg = transformers.LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        intermediate_size=2 * HIDDEN, vocab_size=128, max_position_embeddings=128, use_cache=False,
        attn_implementation=impl,
    )
    return transformers.LlamaModel(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_transformers_training_saves_no_more_than_the_sdpa_model(build):
    torch.manual_seed(0)
    model = build("eager").train()
    twin = build("sdpa").train()
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    ids = torch.randint(1, 128, (B, N))
    _compare(model, twin, lambda: {"input_ids": ids}, LAYERS, LAYERS)
