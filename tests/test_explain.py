"""``fusepass.explain`` runs the model as its docstring says: without gradients unless an
input asks for them."""

from __future__ import annotations

import torch
import torch.nn as nn

import fusepass


class BiasedAttention(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 1, n, n))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5 + self.bias, dim=-1) @ v


def test_explain_runs_without_grad_unless_an_input_requires_it():
    mod = BiasedAttention(6)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    site = fusepass.explain(mod, q, k, v).sites[0]
    assert site.fused and "(grad)" not in site.bias  # no_grad: the parameter's grad is not traced
    site = fusepass.explain(mod, q.requires_grad_(), k, v).sites[0]
    assert site.fused and "(grad)" in site.bias
    assert torch.is_grad_enabled()


class Layer(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = index  # an int attribute Dynamo guards on: one compile per layer

    def forward(self, q, k, v):
        torch._dynamo.graph_break()  # each layer's attention is its own frame
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v + self.index


class Layers(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(i) for i in range(n))

    def forward(self, q, k, v):
        for layer in self.layers:
            q = layer(q, k, v)
        return q


def test_explain_says_when_dynamo_ran_frames_eagerly():
    """A frame Dynamo gives up on (here: its recompile limit; transformers 5.17's BART and
    Whisper: LayerDrop's data-dependent branch in the layer loop) runs eagerly, its attention
    unfused: the report says so, with Dynamo's reason, instead of only counting what it saw."""
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        report = fusepass.explain(Layers(4), q, k, v)
    torch._dynamo.reset()
    # The graph break inside the loop makes Dynamo run Layers.forward eagerly (one frame) and
    # compile each layer's frame on its own; layers 0 and 1 compile, layer 2 hits the limit
    # (a second frame given up) and from then on the function runs eagerly: layers 2 and 3.
    assert report.fused == 2 and len(report.sites) == 2
    assert report.eager_frames == 2
    assert "gave up on 2 frame(s)" in str(report) and "recompile limit" in str(report)
    report = fusepass.explain(Layers(2), q, k, v)
    assert report.fused == 2 and report.eager_frames == 1 and "recompile limit" not in str(report)


def test_importing_the_report_module_keeps_explain_a_function():
    import fusepass.report  # noqa: F401  (a submodule import binds its name on the package)

    assert callable(fusepass.explain) and fusepass.explain is fusepass.report.explain


class Blocks(nn.Module):
    """Two attention sites on one source line, told apart by their modules."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([BiasedAttention(6), BiasedAttention(6)])

    def forward(self, q, k, v):
        for layer in self.layers:
            q = layer(q, k, v)
        return q


def test_rows_name_the_module_and_show_k_v_and_where_they_run():
    q, k = torch.randn(1, 4, 6, 4), torch.randn(1, 4, 6, 4)
    v = torch.randn(1, 4, 6, 4)
    report = fusepass.explain(Blocks(), q, k, v, options={"inner": "aot_eager"})
    assert [s.module for s in report.sites] == ["layers.0", "layers.1"]
    assert len({s.location for s in report.sites}) == 1  # the same line: only the module tells them apart
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "site" and "k/v" in lines[0]
    assert any(ln.startswith("| layers.0 ") for ln in lines) and any(ln.startswith("| layers.1 ") for ln in lines)
    assert "k[1, 4, 6, 4]" in text
    # On CPU tensors the sites run on the reference: a word in the table, the reason once below it.
    assert all(s.runs_on_short == "reference" for s in report.sites)
    assert sum(ln.startswith("runs on reference (CPU tensors") for ln in lines) == 1


def test_short_runs_on_names_the_family():
    from fusepass.spec import SiteRecord

    def short(runs_on):
        return SiteRecord("x.py:1", True, None, runs_on=runs_on).runs_on_short

    assert short("triton, decode family (split-KV)") == "triton decode"
    assert short("triton, prefill family (not decode: query length 64 > 16)") == "triton prefill"
    assert short("triton, decode family for short queries, else prefill (chosen per call)") == "triton"
    assert short("reference (CPU tensors)") == "reference"


def test_module_paths_are_spelled_as_named_modules_spells_them():
    import torch.fx as fx

    from fusepass.backend import module_path

    graph = fx.Graph()
    node = graph.placeholder("x")
    for dynamo, ours in (("L['self'].layers[3]._modules['attn']", "layers.3.attn"),
                         ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
                         ("L['self']", "")):
        node.meta["nn_module_stack"] = {"outer": ("L['self']", nn.Module), "inner": (dynamo, nn.Module)}
        assert module_path(node) == ours
    node.meta.pop("nn_module_stack")
    assert module_path(node) == ""
