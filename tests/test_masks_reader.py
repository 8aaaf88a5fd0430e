"""The mask reader: masks written the ways models write them, read from Dynamo's graph into a
predicate, checked by dense evaluation against the mask tensor computed eagerly."""

from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F
import pytest
from hypothesis import given, settings, HealthCheck, strategies as st

from fusepass.masks import predicate
from fusepass.masks.classify import classify
from fusepass.masks.reader import MaskReading, NotRead, try_read_mask

NEG = torch.finfo(torch.float32).min


def capture(fn, *args, dynamic=False):
    """(graph module, example_inputs) that Dynamo hands a backend for fn(*args)."""
    got = {}

    def backend(gm, example_inputs):
        got["gm"], got["ex"] = gm, example_inputs
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args)
    return got["gm"], got["ex"]


def read_output(fn, args, role, dynamic=False, **kw):
    """Read fn's (single) output as a mask; fn returns the mask tensor."""
    gm, ex = capture(fn, *args, dynamic=dynamic)
    node = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    shape = node.meta["example_value"].shape
    score = (1,) * (4 - len(shape)) + tuple(shape)
    return try_read_mask(node, role, score, ex, **kw), gm, ex


def keep_of(mask: torch.Tensor, role: str) -> torch.Tensor:
    if role == "keep":
        return mask.bool()
    if role == "masked":
        return ~mask.bool()
    return mask == 0


def arg_values(reading: MaskReading, gm, ex):
    """Concrete values of mask_args at the example inputs (SymInt placeholders are ints there)."""
    phs = {n: x for n, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], ex)}
    out = []
    for a in reading.args:
        if isinstance(a, int):
            out.append(a)
        elif a in phs:
            out.append(int(phs[a]))
        else:  # a SymInt computed in the graph: evaluate with the shape env's hint
            out.append(int(a.meta["example_value"].node.hint))
    return out


def check_dense(fn, make_args, role, sizes, dynamic=False, expect_kind=None, **kw):
    for size in sizes:
        args = make_args(size)
        r, gm, ex = read_output(fn, args, role, dynamic=dynamic, **kw)
        assert isinstance(r, MaskReading), f"not read at {size}: {r}"
        mask = fn(*args)
        want = keep_of(mask, role)
        want4 = want.reshape((1,) * (4 - want.dim()) + tuple(want.shape))
        B, H, M, N = want4.shape
        got = predicate.dense_keep(r.expr or "True", B, H, M, N, arg_values(r, gm, ex))
        assert torch.equal(got, want4.expand(B, H, M, N)), f"{r.expr} differs from eager at {size}"
        if expect_kind:
            assert classify(r.expr).kind == expect_kind, (r.expr, classify(r.expr))
    return r


class NanoGPTMask(torch.nn.Module):
    def __init__(self, block_size=64):
        super().__init__()
        T = block_size
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        T = x.size(1)
        return self.bias[:, :, :T, :T] == 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_nanogpt_tril_buffer(dynamic):
    m = NanoGPTMask()
    r = check_dense(m, lambda T: (torch.randn(2, T, 8),), "masked", [7, 33], dynamic=dynamic, expect_kind="causal")
    assert len(r.guards) == 1


def test_changed_tril_buffer_is_noticed():
    m = NanoGPTMask(16)
    r, gm, ex = read_output(m, (torch.randn(1, 10, 4),), "masked")
    g = r.guards[0]
    buf = ex[g.input_index]
    assert buf is m.bias and g.check(buf)
    m.bias[0, 0, 0, 5] = 1.0                      # in place: version bumps, values differ
    assert not g.check(m.bias)
    m.bias[0, 0, 0, 5] = 0.0                      # restored values: re-verified by value
    assert g.check(m.bias)
    assert not g.check(torch.ones(1, 1, 16, 16))  # another tensor with other values
    assert not g.check(torch.tril(torch.ones(1, 1, 8, 8)))
    with torch.no_grad():
        m.bias.data.fill_(1.0)                    # .data writes bypass the version counter
    assert not g.check(m.bias, deep=True)


def test_tril_built_in_graph_and_where_min():
    def f(x):
        T = x.shape[1]
        keep = torch.tril(torch.ones(T, T, dtype=torch.bool))
        return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]

    r = check_dense(f, lambda T: (torch.randn(2, T),), "additive", [5, 19], expect_kind="causal")
    assert r.fill == NEG


@pytest.mark.parametrize("dynamic", [False, True])
def test_abs_window(dynamic):
    def f(x):
        i = torch.arange(x.shape[1])
        return (i[:, None] - i[None, :]).abs() <= 3

    check_dense(f, lambda T: (torch.randn(1, T),), "keep", [6, 21], dynamic=dynamic, expect_kind="band")


def test_sliding_window_masked_fill_additive():
    def f(x):
        T = x.shape[1]
        i = torch.arange(T).unsqueeze(-1)
        j = torch.arange(T).unsqueeze(0)
        hidden = (j > i) | (j <= i - 4)
        return torch.zeros(T, T).masked_fill(hidden, float("-inf")).view(1, 1, T, T)

    r = check_dense(f, lambda T: (torch.randn(1, T),), "additive", [9, 30], expect_kind="sliding_window")
    assert classify(r.expr).name == "sliding_window(4)" and r.fill == float("-inf")


def test_prefix_lm_and_global_tokens():
    def prefix(x, p):
        T = x.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return torch.logical_or(j <= i, j < p.shape[0])

    check_dense(prefix, lambda T: (torch.randn(1, T), torch.zeros(3)), "keep", [8, 17], expect_kind="prefix_lm")

    def glob(x):
        T = x.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return ((i - j).abs() <= 2) | (i < 2) | (j < 2)

    check_dense(glob, lambda T: (torch.randn(1, T),), "keep", [8, 17], expect_kind="global")


@pytest.mark.parametrize("dynamic", [False, True])
def test_causal_with_cache_offset(dynamic):
    def f(x, past):
        M, P = x.shape[1], past.shape[2]
        qi = torch.arange(P, P + M)
        kj = torch.arange(P + M)
        return kj[None, :] <= qi[:, None]

    r = check_dense(f, lambda s: (torch.randn(1, s[0]), torch.zeros(1, 1, s[1])), "keep", [(4, 9), (7, 3)],
                    dynamic=dynamic, expect_kind="causal")
    if dynamic:
        assert r.args, "the cache length is a symbolic argument"


def test_one_minus_mask_times_min_and_chunked():
    def f(x):
        T = x.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        keep = ((i // 4) == (j // 4)) & (j <= i)
        return ((1.0 - keep.float()) * torch.finfo(torch.float32).min)[None, None]

    check_dense(f, lambda T: (torch.randn(1, T),), "additive", [11, 16], expect_kind="chunked_causal")


def test_not_understood_stays_tensor():
    def small_bias(x):                            # -1e4 is a bias, not a mask fill
        T = x.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return ((j > i).float() * -10000.0)[None, None]

    r, _, _ = read_output(small_bias, (torch.randn(1, 6),), "additive")
    assert isinstance(r, NotRead) and "bias" in r.reason

    def data_add(x, m):                           # an additive float data mask
        return m[:, None, None, :] * 2.0

    r, _, _ = read_output(data_add, (torch.randn(1, 6), torch.randn(1, 6)), "additive")
    assert isinstance(r, NotRead)


def test_segment_ids_are_a_data_term():
    def f(x, seg):
        T = x.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        same = seg[:, None, :, None] == seg[:, None, None, :]
        return same & (j <= i)

    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    r, gm, ex = read_output(f, (torch.randn(1, 8), seg), "keep")
    assert isinstance(r, MaskReading) and classify(r.expr).kind == "causal"
    (node, invert), = r.data_masks
    # the data term is a graph node whose value, AND-ed with the predicate, is the mask
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    interp.run(*ex)
    data = interp.env[node]
    got = predicate.dense_keep(r.expr, 1, 1, 8, 8, ()) & (~data if invert else data)
    want = f(torch.randn(1, 8), seg)
    assert torch.equal(got, want.expand_as(got))



def test_data_term_under_an_or_in_an_additive_mask():
    """A data term inside an | makes the whole mask data; read through an additive
    where(keep, 0, min), sympy respells its relations (j <= i as i >= j) and the term must still
    be found as the value of the keep node."""
    def f(x, seg):
        T = x.shape[1]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        keep = ((seg[:, None, :, None] == seg[:, None, None, :]) & (j <= i)) | (j < 2)
        return torch.where(keep, torch.tensor(0.0), NEG)

    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    r, gm, ex = read_output(f, (torch.randn(1, 8), seg), "additive")
    assert isinstance(r, MaskReading), r
    assert r.expr == "" and r.fill == NEG
    (node, invert), = r.data_masks
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    interp.run(*ex)
    data = interp.env[node]
    got = ~data if invert else data
    want = f(torch.randn(1, 8), seg) == 0
    assert torch.equal(got.expand_as(want), want)

def _tiny(model_name):
    import transformers

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**kw),
        "mistral": lambda: transformers.MistralConfig(**kw, sliding_window=5),
        "gemma2": lambda: transformers.Gemma2Config(**kw, sliding_window=5, head_dim=8),
    }[model_name]()
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("model_name,padded", [("llama", False), ("mistral", False), ("gemma2", False),
                                               ("llama", True)])
def test_transformers_masks(model_name, padded):
    """Every softmax's additive mask in a real tiny model reads as the right predicate: checked
    against the mask tensor the graph computes (run the graph, grab the mask node's value)."""
    model = _tiny(model_name)
    ids = torch.randint(0, 64, (2, 11))
    am = torch.ones(2, 11, dtype=torch.long)
    am[0, :3] = 0
    got = {}

    def backend(gm, ex):
        got["gm"], got["ex"] = gm, ex
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(input_ids=ids, attention_mask=am if padded else None,
                                              use_cache=False)
    gm, ex = got["gm"], got["ex"]
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.softmax, torch.softmax)]
    assert len(sites) == 2
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*ex)
    names = []
    for sm in sites:
        add = sm.args[0]
        mask_node = add.args[1]
        score_shape = add.meta["example_value"].shape
        r = try_read_mask(mask_node, "additive", score_shape, ex)
        assert isinstance(r, MaskReading), r
        assert r.fill == NEG
        B, H, M, N = score_shape
        keep = predicate.dense_keep(r.expr, B, H, M, N, [])
        for node, inv in r.data_masks:
            d = interp.env[node]
            keep = keep & (~d if inv else d)
        want = interp.env[mask_node] == 0
        assert torch.equal(keep, want.expand(B, H, M, N))
        assert bool(r.data_masks) == padded
        names.append(classify(r.expr).name)
    expected = {"llama": ["causal"] * 2, "mistral": ["sliding_window(5)"] * 2,
                "gemma2": ["sliding_window(5)", "causal"]}[model_name]
    assert names == expected


# -- property test: random position predicates written as torch code ----------------------

_leaf = st.sampled_from(["i", "j"])


@st.composite
def _lin(draw):
    a, b = draw(_leaf), draw(_leaf)
    c = draw(st.integers(-6, 6))
    form = draw(st.sampled_from(["{a} - {b} + {c}", "{a} + {c}", "abs({a} - {b})", "{a} // {k}", "{a} % {k}"]))
    return form.format(a=a, b=b, c=c, k=draw(st.integers(1, 5)))


@st.composite
def _pred(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        return f"({draw(_lin())} {op} {draw(_lin())})"
    l, r = draw(_pred(depth - 1)), draw(_pred(depth - 1))
    return draw(st.sampled_from([f"({l} & {r})", f"({l} | {r})", f"(~{l})"]))


def _as_torch_code(expr: str):
    """A function computing the predicate with torch ops on aranges, as a model would (the
    expression's AST turned into nested closures, which Dynamo inlines)."""
    import ast
    import operator as op

    binops = {ast.Add: op.add, ast.Sub: op.sub, ast.FloorDiv: op.floordiv, ast.Mod: op.mod,
              ast.BitAnd: op.and_, ast.BitOr: op.or_}
    cmps = {ast.Lt: op.lt, ast.LtE: op.le, ast.Gt: op.gt, ast.GtE: op.ge, ast.Eq: op.eq, ast.NotEq: op.ne}

    def build(n):
        if isinstance(n, ast.Name):
            return lambda env, k=n.id: env[k]
        if isinstance(n, ast.Constant):
            return lambda env, v=n.value: v
        if isinstance(n, ast.UnaryOp):
            a = build(n.operand)
            return (lambda env: ~a(env)) if isinstance(n.op, ast.Invert) else (lambda env: -a(env))
        if isinstance(n, ast.BinOp):
            a, b, f = build(n.left), build(n.right), binops[type(n.op)]
            return lambda env: f(a(env), b(env))
        if isinstance(n, ast.Compare):
            a, b, f = build(n.left), build(n.comparators[0]), cmps[type(n.ops[0])]
            return lambda env: f(a(env), b(env))
        if isinstance(n, ast.Call):
            a = build(n.args[0])
            return lambda env: torch.abs(a(env))
        raise AssertionError(ast.dump(n))

    g = build(ast.parse(expr, mode="eval").body)

    def f(x):
        T = x.shape[1]
        return g({"i": torch.arange(T).view(T, 1), "j": torch.arange(T).unsqueeze(0)}).expand(T, T)

    return f


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(_pred())
def test_random_predicates_read_back(expr):
    f = _as_torch_code(expr)
    for T in (7, 12):
        r, gm, ex = read_output(f, (torch.randn(1, T),), "keep")
        assert isinstance(r, MaskReading), (expr, r)
        want = f(torch.randn(1, T))
        got = predicate.dense_keep(r.expr or "True", 1, 1, T, T, arg_values(r, gm, ex))[0, 0]
        assert torch.equal(got, want), (expr, r.expr)


def test_a_mask_that_hides_every_key_reads_as_false():
    """An additive mask of fill everywhere reads as the constant predicate "False"; every
    consumer of predicate text takes it (the row-emptiness proof crashed on the Python bool)."""
    from fusepass.graph.predicates import rows_never_empty
    from fusepass.masks import tiles

    def f(x):
        T = x.shape[1]
        return torch.full((1, 1, T, T), NEG)

    r, _, _ = read_output(f, (torch.randn(1, 6),), "additive")
    assert isinstance(r, MaskReading) and r.expr == "False" and r.fill == NEG
    assert predicate.to_sympy("False") is sympy.false and predicate.to_sympy("True") is sympy.true
    assert rows_never_empty("False", 6, 6) is False and rows_never_empty("", 6, 6) is True
    assert classify("False").kind == "empty"
    assert tiles.skipped_fraction("False", 64, 64, 32, 32) == 1.0


def test_rows_never_empty_holds_for_every_size_of_a_symbolic_graph():
    """The proof is over the sizes a graph serves: with symbolic lengths, a sliding window is
    never empty only when M <= N is known (its last rows past N see nothing otherwise)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fusepass.graph.predicates import rows_never_empty

    env = ShapeEnv()
    s0 = env.create_unbacked_symint()
    s1 = env.create_unbacked_symint()
    window = "(j <= i) & (i - j < 4)"
    assert rows_never_empty(window, 7, 7) and not rows_never_empty(window, 40, 36)
    assert rows_never_empty(window, s0, s0)
    assert not rows_never_empty(window, s0, s1)
    assert rows_never_empty("j <= i", s0, s1)  # key 0, whatever the lengths
    assert not rows_never_empty("j <= i + (N - M)", s0, s1)  # M > N: the first rows see nothing
    assert not rows_never_empty("abs(i - j) <= a0", 8, 8)  # a0 may be negative
