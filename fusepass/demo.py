"""``fusepass demo``: a small GPT written the ordinary way, compiled with fusepass, checked against eager."""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    """Causal self-attention as people write it: a tril buffer, masked_fill, softmax, dropout."""

    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        groups = self.heads // self.kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        att = att.masked_fill(self.tril[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att.float(), dim=-1).type_as(q)
        att = self.drop(att)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, max_len, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, kv_heads, max_len, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, dim=128, heads=4, kv_heads=2, layers=2, max_len=256, dropout=0.1):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, max_len, dropout) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _timed(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> int:
    import fusepass

    parser = argparse.ArgumentParser(prog="fusepass demo", description=__doc__)
    cuda = torch.cuda.is_available()
    parser.add_argument("--inner", default="inductor" if cuda else "aot_eager",
                        help="compiler for the rest of the graph (default: inductor on GPU, aot_eager on CPU)")
    parser.add_argument("--seq", type=int, default=256 if cuda else 64)
    parser.add_argument("--batch", type=int, default=8 if cuda else 2)
    args = parser.parse_args(argv)

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = TinyGPT(max_len=max(256, args.seq)).to(device=device, dtype=dtype).eval()
    idx = torch.randint(0, 256, (args.batch, args.seq), device=device)
    options = {"inner": args.inner}

    print(f"fusepass demo: TinyGPT (2 layers, 4 query heads over 2 kv heads), {dtype}, {device}, "
          f"batch {args.batch} x {args.seq} tokens, inner compiler {args.inner}\n")
    with torch.no_grad():
        report = fusepass.explain(model, idx, options=options)
        print(report, "\n")
        compiled = torch.compile(model, backend="fusepass", options=options)
        got = compiled(idx)
        want = model(idx)
        want64 = model.double()(idx).float()
        model.to(dtype)
        err_fused = (got.float() - want64).abs().max().item()
        err_eager = (want.float() - want64).abs().max().item()
        print(f"max |fused - float64 eager| = {err_fused:.3e}   (eager in {dtype}: {err_eager:.3e})")
        t_eager = _timed(lambda: model(idx), 5)
        t_fused = _timed(lambda: compiled(idx), 5)
        print(f"eager {t_eager:.2f} ms, fusepass {t_fused:.2f} ms per forward")
    ok = report.fused == len(report.sites) == 2 and err_fused <= 4 * err_eager + 1e-5
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
