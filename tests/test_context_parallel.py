"""Context parallelism: the sequence sharded over CPU ranks (gloo), every fused attention a ring.

The spawned tests shard the inputs with torch's own ``context_parallel`` context manager (as
for SDPA) and compile with ``options={"context_parallel": mesh}``; outputs and gradients must
be those of one process on the whole sequence, with every site fused on every rank and the
ring really run.  The rest are single-process unit tests: the lse merge, the chunk pairs'
predicates, the layouts against torch's load balancer, and the compile-time refusals.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from spawn_util import run_ranks

from fusepass.masks import predicate
from fusepass.ops import attention as op
from fusepass.options import Options, RunOptions
from fusepass.parallel import global_predicate, layout, merge

B, S, E, H = 2, 16, 16, 4  # batch, whole-sequence tokens, width, query heads
D = E // H
TIMEOUT_S = 120



@dataclasses.dataclass(frozen=True)
class Case:
    kv_heads: int = H
    window: int = 0  # sliding window; 0: causal only
    softcap: float = 0.0
    key_padding: bool = False  # a [B, 1, 1, N] mask tensor besides the predicate
    layout: str = "head_tail"
    fill: float = float("-inf")  # what masked scores become


CASES = {
    "causal": Case(),
    "window": Case(window=5, layout="contiguous", fill=torch.finfo(torch.float32).min),
    "gqa": Case(kv_heads=H // 2, softcap=20.0, key_padding=True),
}


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d) if groups > 1 else x


class Block(nn.Module):
    """Pre-norm attention block, the attention as model code writes it.  The masks are built from
    the local length n: fusepass reads them as predicates and evaluates them on global positions."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.kv_heads, self.window, self.softcap, self.fill = case.kv_heads, case.window, case.softcap, case.fill
        kv_heads = case.kv_heads
        self.norm = nn.LayerNorm(E)
        self.q_proj, self.o_proj = nn.Linear(E, E), nn.Linear(E, E)
        self.k_proj, self.v_proj = nn.Linear(E, kv_heads * D), nn.Linear(E, kv_heads * D)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x, keep=None):
        b, n, _ = x.shape
        h = self.norm(x)
        q = self.q_proj(h).view(b, n, H, D).transpose(1, 2)
        k, v = (p(h).view(b, n, self.kv_heads, D).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        k, v = repeat_kv(k, H // self.kv_heads), repeat_kv(v, H // self.kv_heads)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        i = torch.arange(n, device=x.device)
        visible = i[None, :] <= i[:, None]
        if self.window:
            visible = visible & (i[:, None] - i[None, :] < self.window)
        s = s.masked_fill(~visible, self.fill)
        if keep is not None:  # key padding, [B, 1, 1, N]
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        a = torch.softmax(s, dim=-1) @ v
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, n, E))
        return x + self.mlp(x)


class Model(nn.Module):
    def __init__(self, case: Case) -> None:
        super().__init__()
        self.pos = nn.Embedding(S, E)  # indexed by a position buffer that is sharded with the tokens
        self.blocks = nn.ModuleList(Block(case) for _ in range(2))

    def forward(self, x, pos, keep=None):
        x = x + self.pos(pos)
        for block in self.blocks:
            x = block(x, keep)
        return x


def _model(case: str) -> Model:
    torch.manual_seed(0)
    return Model(CASES[case])


def _inputs(case: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, E, generator=g)
    keep = None
    if CASES[case].key_padding:
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[1, -3:] = False  # right padding; every query still sees key 0
    return x, torch.arange(S), keep


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().sum() / (B * S * E)  # the whole sequence's mean, summed over ranks


def _reference(case: str) -> dict:
    model = _model(case)
    x, pos, keep = _inputs(case)
    x.requires_grad_(True)
    out = model(x, pos, keep)
    _loss(out).backward()
    return {"out": out.detach(), "x_grad": x.grad, "grads": {n: p.grad for n, p in model.named_parameters()}}


def _exchanges_per_step(world: int) -> int:
    """Ring exchanges of one forward and backward of the two-block model: per site W-1 K/V
    shifts forward, W-1 K/V shifts and W gradient shifts backward."""
    return 2 * (world - 1) + 2 * (2 * world - 1)


def _run_case(case: str, mesh, world: int) -> dict:
    from torch._dynamo.utils import counters
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, context_parallel_unshard

    torch._dynamo.reset()
    counters.clear()
    cp_layout = CASES[case].layout
    model = _model(case)
    x_full, pos_full, keep_full = _inputs(case)
    x, pos = x_full.clone(), pos_full.clone()
    buffers, dims = [x, pos], [1, 0]
    if keep_full is not None:
        keep = keep_full.clone()
        buffers.append(keep)
        dims.append(1)
    compiled = torch.compile(model, backend="fusepass",
                             options={"inner": "aot_eager", "context_parallel": mesh,
                                      "context_parallel_layout": cp_layout})
    balance = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = cp_layout == "head_tail"  # torch's switch for its layout
    try:
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=dims):
            # torch sharded the buffers in place: its layout must be ours.
            group = mesh.get_group()
            layouts_agree = all(torch.equal(b, layout.shard_sequence(full, d, group, cp_layout))
                                for b, full, d in zip(buffers, (x_full, pos_full, keep_full), dims))
            x_local = x.detach().clone().requires_grad_(True)
            out = compiled(x_local, pos, buffers[2] if len(buffers) > 2 else None)
            _loss(out).backward()
    finally:
        _cp_options.enable_load_balance = balance
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=group)  # each rank's share of the whole sequence's loss
        grads[name] = p.grad.detach().clone()
    out_full = layout.unshard_sequence(out.detach(), 1, group, cp_layout)
    unshard_agrees = True
    if cp_layout == "head_tail":  # torch's unshard restores its head-tail order
        (torch_full,) = context_parallel_unshard(mesh, [out.detach()], [1])
        unshard_agrees = torch.equal(torch_full, out_full)
    return {
        "out": out_full, "x_grad": layout.unshard_sequence(x_local.grad, 1, group, cp_layout), "grads": grads,
        "fused": counters["fusepass"]["attention_fused"], "rejected": counters["fusepass"]["attention_rejected"],
        "exchanges": counters["fusepass"]["cp_ring_exchanges"], "layouts_agree": layouts_agree,
        "unshard_agrees": unshard_agrees,
    }


def _worker(rank: int, world: int, cases: list[str], out_dir: str, init_file: str) -> None:
    import fusepass  # noqa: F401  (registers the backend)
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {case: _run_case(case, mesh, world) for case in cases}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, cases", [(2, ["causal", "window", "gqa"]), (4, ["causal"])])
def test_ring_matches_one_process(world, cases, tmp_path):
    run_ranks(_worker, (world, cases, str(tmp_path)), world, tmp_path, TIMEOUT_S, f"{world} ranks")
    for case in cases:
        want = _reference(case)
        for rank in range(world):
            got = torch.load(tmp_path / f"rank{rank}.pt")[case]
            where = f"{case}, rank {rank} of {world}"
            assert got["fused"] == 2 and got["rejected"] == 0, f"{where}: fused {got['fused']}, rejected {got['rejected']}"
            assert got["exchanges"] == _exchanges_per_step(world), f"{where}: {got['exchanges']} ring exchanges"
            assert got["layouts_agree"], f"{where}: torch's context_parallel sharded otherwise than layout.py"
            assert got["unshard_agrees"], f"{where}: torch's context_parallel_unshard disagrees with ours"
            torch.testing.assert_close(got["out"], want["out"], msg=lambda m: f"{where} output: {m}")
            torch.testing.assert_close(got["x_grad"], want["x_grad"], msg=lambda m: f"{where} input grad: {m}")
            assert set(got["grads"]) == set(want["grads"])
            for name, g in want["grads"].items():
                torch.testing.assert_close(got["grads"][name], g, msg=lambda m: f"{where} {name}: {m}")


# ---------------------------------------------------------------- single process


def _attention(q, k, v, mask_expr="", mask_args=()):
    return op.attention(q, k, v, [], [], None, D ** -0.5, 0.0, 0.0, float("-inf"), mask_expr,
                                        list(mask_args))


def test_lse_merge_equals_one_call_over_all_keys():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, D, generator=g) for n in (6, 10, 10))
    # Keys visible up to the row's index, and none at all for row 2: rows 0-4 see no key of the
    # second chunk (j >= 5), row 2 sees none anywhere (NaN out, lse -inf, as the op gives).
    expr = "(j <= i) & (i != 2)"
    want_out, want_lse = _attention(q, k, v, expr)
    assert torch.isnan(want_out[:, :, 2]).all() and torch.isneginf(want_lse[:, :, 2]).all()
    acc = None
    for j0, j1 in ((0, 5), (5, 10)):
        args = global_predicate.pair_args((), 0, j0, 6, 10)
        out, lse = _attention(q, k[:, :, j0:j1], v[:, :, j0:j1], global_predicate.on_global_positions(expr, 0), args)
        acc = merge.add(acc, out, lse)
    assert torch.isneginf(lse[:, :, :5]).all()  # the second chunk hid rows 0-4 entirely
    out, lse = merge.finish(acc, want_out.shape, want_out.dtype, q.device)
    torch.testing.assert_close(out, want_out, equal_nan=True)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("expr", ["j <= i", "(j <= i) & (i - j < 3)", "j <= i + (N - M)", "(i // 4) == (j // 4)"])
def test_pair_predicate_is_the_global_one_on_the_pair(expr):
    world, total = 2, 16
    want = predicate.dense_keep(expr, 1, 1, total, total, ())[0, 0]
    for q_rank in range(world):
        for k_rank in range(world):
            for qs in layout.segments("head_tail", q_rank, world, total // world):
                for ks in layout.segments("head_tail", k_rank, world, total // world):
                    pair = global_predicate.on_global_positions(expr, 0)
                    args = global_predicate.pair_args((), qs.start, ks.start, total, total)
                    got = predicate.dense_keep(pair, 1, 1, qs.length, ks.length, args)[0, 0]
                    block = want[qs.start:qs.start + qs.length, ks.start:ks.start + ks.length]
                    assert torch.equal(got, block), (expr, qs, ks)
                    if global_predicate.hides_all(pair, args, qs.length, ks.length):
                        assert not block.any()  # skipping is sound


def test_causal_pairs_are_balanced():
    """Under the head-tail layout every rank runs the same number of pairs for a causal mask."""
    world, total = 4, 32
    pair = global_predicate.on_global_positions("j <= i", 0)
    counts = []
    for q_rank in range(world):
        n = 0
        for k_rank in range(world):
            for qs in layout.segments("head_tail", q_rank, world, total // world):
                for ks in layout.segments("head_tail", k_rank, world, total // world):
                    args = global_predicate.pair_args((), qs.start, ks.start, total, total)
                    n += not global_predicate.hides_all(pair, args, qs.length, ks.length)
        counts.append(n)
    assert counts == [2 * world + 1] * world  # 3 pairs with its own chunk, 2 with each other rank's


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_head_tail_layout_is_torchs(world):
    from torch.distributed.tensor.experimental._context_parallel import _HeadTailLoadBalancer

    total = 8 * world
    torch_order = _HeadTailLoadBalancer(total, world, "cpu")._generate_indices()[0].long()
    ours = torch.cat([layout.positions("head_tail", r, world, total) for r in range(world)])
    assert torch.equal(ours, torch_order)
    x = torch.arange(total * 3).view(3, total)
    shards = [layout.shard_sequence(x, 1, rank=r, world=world) for r in range(world)]
    assert torch.equal(torch.cat(shards, dim=1), x[:, torch_order])


def test_head_tail_refuses_odd_shards():
    with pytest.raises(ValueError, match="contiguous"):
        layout.segments("head_tail", 0, 2, 5)


def test_run_options_carry_the_group_and_layout():
    run = Options(context_parallel="7", context_parallel_layout="contiguous").run()
    assert run == RunOptions(autotune=True, cp_group="7", cp_layout="contiguous")
    assert RunOptions.decode(run.encode()) == run and run.context_parallel
    assert not run.local().context_parallel and run.local().autotune
    with pytest.raises(ValueError, match="run option"):
        RunOptions.decode("cp_group=")
    with pytest.raises(ValueError, match="together"):
        RunOptions.decode("cp_group=7")
    with pytest.raises(ValueError, match="context_parallel_layout"):
        Options(context_parallel_layout="zigzag")
    with pytest.raises(ValueError, match="fuse"):
        Options(context_parallel="7", fuse=False)


class BiasedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rel = nn.Parameter(torch.zeros(S, S))  # a learned [N, N] bias: the local shard's values

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + self.rel[:n, :n]
        return torch.softmax(s, dim=-1) @ v


class QueryMaskedAttention(nn.Module):
    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class WeightsReturned(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        return p @ v, p  # the weights escape: the matcher refuses the site


@pytest.mark.parametrize("module, extra, what", [
    (BiasedAttention(), (), "additive bias"),
    (QueryMaskedAttention(), (torch.rand(S // 2, S // 2) > 0.3,), "varies over queries"),
    (WeightsReturned(), (), "not fused"),
])
def test_site_the_ring_cannot_serve_is_an_error(module, extra, what):
    """Compile-time: no process group is needed (the group is named, resolved per call)."""
    q = torch.randn(B, H, S // 2, D)
    compiled = torch.compile(module, backend="fusepass", options={"inner": "aot_eager", "context_parallel": "0"})
    with pytest.raises(Exception, match="context_parallel") as info:
        compiled(q, q, q, *extra)
    message = str(info.value)
    assert what in message and "test_context_parallel.py:" in message, message
