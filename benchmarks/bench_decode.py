"""Decode attention: one (or a few) new queries per sequence against a long KV cache.

bf16, D=128 (and 64), Hq=32 query heads over Hkv key/value heads.  fusepass runs through
``torch.compile(plain GQA attention code, backend="fusepass")`` (autotune off, static shapes);
beside it SDPA (``enable_gqa``), compiled FlexAttention (flex decoding), in the same run; then
SDPA under ``torch.compile`` (the same Dynamo and wrapper cost per call as fusepass's column) and
both under ``mode="reduce-overhead"`` (CUDA graphs: no host time per call; fusepass's autotune
follows ``FUSEPASS_AUTOTUNE``, as ``mode`` and ``options`` exclude each other).
Times are ``triton.testing.do_bench`` medians (µs); KV TB/s counts K and V read once.  Every
provider's output is checked against SDPA.  A second table puts the two fusepass kernel
families side by side (the launchers called directly, with and without the host's time) for
the crossover rule of ``fusepass/kernels/decode.py``.

    PYTHONPATH=$PWD python benchmarks/bench_decode.py [--quick] [--no-families | --families-only]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton.testing

WINDOW = 1024


def plain_attention(q, k, v, keep):
    """GQA attention as model code writes it: repeat K/V heads, mask, softmax, P @ V."""
    G = q.shape[1] // k.shape[1]
    k = k[:, :, None].expand(-1, -1, G, -1, -1).reshape(q.shape[0], q.shape[1], k.shape[2], k.shape[3])
    v = v[:, :, None].expand(-1, -1, G, -1, -1).reshape(q.shape[0], q.shape[1], v.shape[2], v.shape[3])
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def additive(q, k, v, pad):
    """A padding mask as transformers' eager attention writes it: added to the scores as 0 or the
    dtype's minimum (a finite fill), before a float32 softmax."""
    G = q.shape[1] // k.shape[1]
    k = k[:, :, None].expand(-1, -1, G, -1, -1).reshape(q.shape[0], q.shape[1], k.shape[2], k.shape[3])
    v = v[:, :, None].expand(-1, -1, G, -1, -1).reshape(q.shape[0], q.shape[1], v.shape[2], v.shape[3])
    bias = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(~pad, torch.finfo(q.dtype).min)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def windowed(q, k, v, pad):
    """Sliding window over the cache, read from code (a position predicate), and a padding mask."""
    M, N = q.shape[2], k.shape[2]
    i = torch.arange(M, device=q.device)[:, None] + (N - M)
    j = torch.arange(N, device=q.device)[None, :]
    keep = (j <= i) & (j > i - WINDOW)
    return plain_attention(q, k, v, keep & pad)


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def providers(q, k, v, pad, mask_kind):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hq, M, _ = q.shape
    N = k.shape[2]
    if mask_kind == "none":
        code, keep4 = (lambda q, k, v: plain_attention(q, k, v, None)), None
    elif mask_kind == "padding":
        code, keep4 = (lambda q, k, v: plain_attention(q, k, v, pad)), pad.expand(B, 1, M, N)
    elif mask_kind == "padding, finite fill":  # what a transformers eager model's decode step runs
        code, keep4 = (lambda q, k, v: additive(q, k, v, pad)), pad.expand(B, 1, M, N)
    else:
        code = lambda q, k, v: windowed(q, k, v, pad)  # noqa: E731
        i = torch.arange(M, device=q.device)[:, None] + (N - M)
        j = torch.arange(N, device=q.device)[None, :]
        keep4 = ((j <= i) & (j > i - WINDOW)) & pad
    fused = torch.compile(code, backend="fusepass", options={"autotune": False}, dynamic=False)
    # CUDA graphs: what a decode loop under mode="reduce-overhead" pays (no host time per call).
    # The tensors get static addresses, as a StaticCache's buffers have: else every replay first
    # copies K and V into the graph's own inputs (2026-12-03: 4x the kernel's time at N=32k).
    for t in (q, k, v):
        torch._dynamo.mark_static_address(t)
    fused_graphs = torch.compile(code, backend="fusepass", mode="reduce-overhead", dynamic=False)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep4, enable_gqa=True)  # noqa: E731
    sdpa_c = torch.compile(sdpa, dynamic=False)
    sdpa_graphs = torch.compile(sdpa, mode="reduce-overhead", dynamic=False)
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if keep4 is not None:
        dense = keep4.expand(B, 1, M, N)
        block_mask = create_block_mask(lambda b, h, qi, kj: dense[b, 0, qi, kj], B, None, M, N, device=q.device)
    return {
        "fusepass": lambda: fused(q, k, v),
        "sdpa": lambda: sdpa(q, k, v),
        "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
        "sdpa compiled": lambda: sdpa_c(q, k, v),
        "fusepass graphs": lambda: fused_graphs(q, k, v),
        "sdpa graphs": lambda: sdpa_graphs(q, k, v),
    }


SHAPES_FULL = [  # (B, N, Hkv, D, mask)
    (8, 4096, 8, 128, "none"), (8, 32768, 8, 128, "none"), (1, 131072, 8, 128, "none"),
    (1, 1024, 8, 128, "none"), (32, 4096, 8, 128, "none"), (8, 16384, 32, 128, "none"),
    (8, 16384, 4, 128, "none"), (8, 16384, 8, 64, "none"), (8, 8192, 8, 128, "padding"),
    (8, 8192, 8, 128, "padding, finite fill"), (8, 32768, 8, 128, "window"),
]
SHAPES_QUICK = SHAPES_FULL[:4]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the first four shapes only")
    ap.add_argument("--no-families", action="store_true", help="skip the two-family table")
    ap.add_argument("--families-only", action="store_true", help="only the two-family table")
    args = ap.parse_args()
    if args.families_only:
        import fusepass  # noqa: F401

        return families("cuda")
    import fusepass  # noqa: F401

    torch._dynamo.config.cache_size_limit = 256
    dev = "cuda"
    Hq = 32
    rows = []
    for B, N, Hkv, D, mask_kind in SHAPES_QUICK if args.quick else SHAPES_FULL:
        torch.manual_seed(0)
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
        pad = torch.ones(B, 1, 1, N, dtype=torch.bool, device=dev)
        pad[0, ..., : N // 8] = False  # the first sequence is left-padded
        want = None
        cells = {}
        for name, fn in providers(q, k, v, pad, mask_kind).items():
            try:
                out = fn()
                if want is None:
                    want = F.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), enable_gqa=True,
                        attn_mask=None if mask_kind == "none" else _keep(q, k, pad, mask_kind))
                err = (out.float() - want).abs().max().item()
                if not err <= 2e-2:
                    raise AssertionError(f"max error {err:.3g}")
                cells[name] = us(fn)
            except Exception as e:
                cells[name] = f"{type(e).__name__}: {str(e)[:50]}"
        kv_bytes = 2 * B * Hkv * N * D * 2
        rows.append((B, N, Hq, Hkv, D, mask_kind, cells, kv_bytes))
        print(rows[-1][:6], {k: (round(v, 1) if isinstance(v, float) else v) for k, v in cells.items()}, flush=True)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, one query per sequence; "
          "µs (KV TB/s)\n")
    print("| B | N | Hq/Hkv | D | mask | fusepass | SDPA | Flex | SDPA compiled | fusepass graphs | SDPA graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, N, Hq_, Hkv, D, mask_kind, cells, kv_bytes in rows:
        def cell(name):
            t = cells.get(name)
            return f"{t:.1f} ({kv_bytes / t / 1e6:.2f})" if isinstance(t, float) else str(t)
        print(f"| {B} | {N} | {Hq_}/{Hkv} | {D} | {mask_kind} | {cell('fusepass')} | {cell('sdpa')} | {cell('flex')} | "
              f"{cell('sdpa compiled')} | {cell('fusepass graphs')} | {cell('sdpa graphs')} |")

    if not args.no_families:
        families(dev)


def graph_us(fn) -> float:
    """GPU time of ``fn`` alone: replayed from a CUDA graph, so no host time is counted."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return us(g.replay)


def families(dev: str) -> None:
    """The two fusepass families on the same calls (launchers called directly, no compile): the
    crossover of decode.MIN_KV_LEN, with the host's time per call (back to back) and without it
    (CUDA-graph replay: what reduce-overhead pays)."""
    from fusepass.kernels import decode, forward
    from fusepass.ops.dispatch import forward_call

    Ns = (256, 512, 1024, 2048, 4096)
    print("\nfusepass kernel families, Hq=32, Hkv=8, D=128, bf16, µs (decode / prefill): "
          "back to back (host included) | CUDA-graph replay (GPU only)\n")
    print("| B | M | " + " | ".join(f"N={n}" for n in Ns) + " |")
    print("|---|---|" + "---|" * len(Ns))
    for B in (1, 8):
        for M in (1, 4, 16):
            line = []
            for N in Ns:
                q = torch.randn(B, 32, M, 128, device=dev, dtype=torch.bfloat16)
                k, v = (torch.randn(B, 8, N, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
                call = forward_call(q, k, v, [], [], None, 128 ** -0.5, 0.0, 0.0, -math.inf, "j <= i + (N - M)", [],
                                    "autotune=0")
                a, _ = decode.attention_forward(call)
                b, _ = forward.attention_forward(call)
                assert (a.float() - b.float()).abs().max().item() < 2e-2
                fd, fp = (lambda: decode.attention_forward(call)), (lambda: forward.attention_forward(call))
                line.append(f"{us(fd):.1f} / {us(fp):.1f} \\| {graph_us(fd):.1f} / {graph_us(fp):.1f}")
            print(f"| {B} | {M} | " + " | ".join(line) + " |", flush=True)
    from fusepass.kernels.launch_common import launches

    print(f"\nkernel launches: {dict(launches)}")


def _keep(q, k, pad, mask_kind):
    B, _, M, _ = q.shape
    N = k.shape[2]
    if mask_kind.startswith("padding"):  # no row is all padding: either fill gives one softmax
        return pad.expand(B, 1, M, N)
    i = torch.arange(M, device=q.device)[:, None] + (N - M)
    j = torch.arange(N, device=q.device)[None, :]
    return ((j <= i) & (j > i - WINDOW)) & pad


if __name__ == "__main__":
    main()
