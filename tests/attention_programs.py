"""Random attention programs written the ways real code writes attention, and a differential
check of fusepass against eager on each (used by tests/test_fuzz.py and benchmarks/fuzz_gpu.py).

A program is a frozen ``Program``: one field per dimension of variation (layout, contraction,
K transpose, scale placement, softcap, bias, masks, softmax spelling, dropout, GQA, in-place
writes, near-misses), all plain strings and ints so that a failing program prints as a
constructor call that can be pasted into the regression list.  ``generate(choose)`` draws one
field group after another with one ``draw_*`` function per dimension; ``choose(name, options)``
is hypothesis's ``sampled_from`` in the tests and ``random.choice`` in the GPU script.  Options
are listed simplest first, so hypothesis shrinks towards the plain program.

``AttentionProgram(prog)`` is the nn.Module the program describes; its forward is straight-line
code that calls one small function per dimension.  ``check_program(prog, options)`` runs it
eagerly, under fusepass, and in float64 (the same module and inputs, upcast), forward and
backward, and raises ``ProgramFailure`` (an AssertionError with a ``kind``) when outputs,
gradients of inputs and parameters, or the final values of mutated buffers and inputs
disagree, when NaN patterns differ from eager's, or when the fused counter contradicts
``expected_fusion(prog)``.

Notation: q [B, H, M, D], k [B, HKV, N, D], v [B, HKV, N, Dv]; scores [B, H, M, N].  Storage
layouts are named by their axes in that notation: "bhnd" (head-major), "bnhd" (token-major,
a projection's view), "bhdn" (K stored transposed).  Rank 3 flattens [B*H, N, D], rank 2 is
one head [N, D].
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from e2e_util import fresh_leaves, projection_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOFTCAP = 2.0  # small, so that the tanh really bends typical scores
WINDOW = 4  # sliding window width
BAND = 2  # band half-width
P_EVAL_DROPOUT = 0.25  # dropout probability of the eval-mode (inactive) spellings
# On a failure, check_program also compiles the program without fusepass, to tell torch's
# failures from fusepass's (one more compile); a minimizer may turn this off.
DIAGNOSE = True


@dataclasses.dataclass(frozen=True)
class Program:
    dtype: str = "float32"
    rank: int = 4  # 4: [B, H, N, D]; 3: [B*H, N, D]; 2: [N, D]
    source: str = "leaves"  # leaves: q, k, v are inputs; proj: nn.Linear projections of x, y
    B: int = 2
    H: int = 2
    groups: int = 1  # query heads per key/value head (HKV = H // groups)
    M: int = 8
    N: int = 8  # with a KV cache: past + M
    D: int = 8
    Dv: int = 8
    past: int = 0  # KV cache: keys already cached before this call
    qk: str = "@"  # @ | torch.matmul | Tensor.matmul | torch.bmm | baddbmm(...) | einsum
    pv: str = "@"  # @ | torch.matmul | Tensor.matmul | torch.bmm | einsum
    qk_eq: str = ""  # the einsum equations, when einsum
    pv_eq: str = ""
    q_store: str = "bhnd"  # storage layouts (see the module docstring)
    k_store: str = "bhnd"
    v_store: str = "bhnd"
    out_store: str = "bhnd"
    k_form: str = "transpose(-2,-1)"  # how K becomes [.., D, N] for a matmul (a K_FORMS key)
    gqa: str = ""  # "" | repeat_kv | repeat_interleave
    scale: str = "/ math.sqrt(d)"  # a SCALES key
    scale_dtype: str = ""  # dtype of a 0-d scale tensor ("" = the scores' dtype)
    softcap: str = ""  # "" | a SOFTCAPS key
    bias: str = ""  # "" | param | input | input_grad
    bias_shape: str = ""  # which axes of [B, H, M, N] (or [Z, M, N], [M, N]) the bias has, e.g. "1HMN"
    bias_op: str = "s + b"  # a BIAS_OPS key
    masks: tuple = ()  # "pattern/apply/fill" strings, applied in order after the bias
    softmax: str = "F.softmax"  # a SOFTMAXES key
    dropout: str = ""  # "" | a DROPOUTS key
    inplace: str = ""  # "" | counter | input.add_ | kv_cache[slice] | kv_cache.index_copy_ | q.mul_
    near_miss: str = ""  # "" | a NEAR_MISSES key
    grad: bool = True  # inputs and parameters require grad (never for float16)
    dynamic: bool = False  # torch.compile(dynamic=True)

    def __str__(self) -> str:
        """Only the fields that differ from the plain program: short and pasteable."""
        d = Program()
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) != getattr(d, f.name)]
        return f"Program({', '.join(fields)})"

    @property
    def HKV(self) -> int:
        return self.H // self.groups

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def scale_value(self) -> float:
        return self.D ** -0.5


# ---------------------------------------------------------------- sizes (profiles)
@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and dtypes a run draws from (the first of each is the default a shrink goes to)."""

    dtypes: tuple = ("float32", "bfloat16", "float16")
    seq: tuple = (8, 1, 3, 17, 33)
    head_dim: tuple = (8, 3, 16, 17)
    batch: tuple = (2, 1)
    heads: tuple = (2, 1, 4)


REFERENCE = Profile()
INTERPRETER = Profile(seq=(8, 1, 3, 17), head_dim=(8, 3, 16), heads=(2, 1))
GPU = Profile(seq=(64, 1, 3, 17, 33, 129, 257), head_dim=(64, 16, 17, 40, 80, 128), heads=(2, 1, 4, 8))

Choose = Callable[[str, Sequence[Any]], Any]


# ---------------------------------------------------------------- the vocabulary
# K as stored -> [.., D, N] for q @ kt: (storage layout, ranks it applies to, the spelling)
K_FORMS: dict[str, tuple[str, tuple, Callable]] = {
    "transpose(-2,-1)": ("bhnd", (4, 3, 2), lambda k: k.transpose(-2, -1)),
    "transpose(pos)": ("bhnd", (4, 3, 2), lambda k: k.transpose(k.dim() - 2, k.dim() - 1)),
    ".mT": ("bhnd", (4, 3, 2), lambda k: k.mT),
    "permute": ("bhnd", (4, 3, 2), lambda k: k.permute(*range(k.dim() - 2), k.dim() - 1, k.dim() - 2)),
    ".t()": ("bhnd", (2,), lambda k: k.t()),
    ".T": ("bhnd", (2,), lambda k: k.T),
    "stored [D, N]": ("bhdn", (4, 3, 2), lambda k: k),
    "permute [B, N, H, D]": ("bnhd", (4,), lambda k: k.permute(0, 2, 3, 1)),
}

# einsum spellings: equation in the letters b, h (batch), i (queries), j (keys), d (features),
# and the storage layouts of the operands (and of P·V's output).
EINSUM_QK = {
    4: [("bhid,bhjd->bhij", "bhnd", "bhnd"), ("bhid,bhdj->bhij", "bhnd", "bhdn"),
        ("bihd,bjhd->bhij", "bnhd", "bnhd"), ("bhid,bjhd->bhij", "bhnd", "bnhd"),
        ("...id,...jd->...ij", "bhnd", "bhnd")],
    3: [("bid,bjd->bij", "bhnd", "bhnd"), ("bid,bdj->bij", "bhnd", "bhdn"), ("...id,...jd->...ij", "bhnd", "bhnd")],
    2: [("id,jd->ij", "bhnd", "bhnd"), ("id,dj->ij", "bhnd", "bhdn")],
}
EINSUM_PV = {  # (equation, v storage, output storage)
    4: [("bhij,bhjd->bhid", "bhnd", "bhnd"), ("bhij,bjhd->bihd", "bnhd", "bnhd"),
        ("bhij,bjhd->bhid", "bnhd", "bhnd"), ("bhij,bhjd->bihd", "bhnd", "bnhd"),
        ("...ij,...jd->...id", "bhnd", "bhnd")],
    3: [("bij,bjd->bid", "bhnd", "bhnd"), ("...ij,...jd->...id", "bhnd", "bhnd")],
    2: [("ij,jd->id", "bhnd", "bhnd")],
}
# Other letters for the same axes: subscripts are arbitrary.
RENAMINGS = ("bhijd", "bnqkc", "zyxwv", "nhmsf")

MATMULS = {
    "@": lambda a, b: a @ b,
    "torch.matmul": lambda a, b: torch.matmul(a, b),
    "Tensor.matmul": lambda a, b: a.matmul(b),
    "torch.bmm": lambda a, b: torch.bmm(a, b),
}
BADDBMMS = ("baddbmm(empty, beta=0)", "baddbmm(zeros, beta=1)", "baddbmm(bias, beta=1)")

SCALES = (
    "/ math.sqrt(d)", "/ math.sqrt(q.size(-1))", "* d**-0.5", "none", "q pre-scaled", "k pre-scaled",
    "q and k split", "* 0-d tensor", "/ 0-d tensor", "baddbmm alpha", "s.div_", "q.mul_",
)
SOFTCAPS = {
    "tanh(s / c) * c": lambda s: torch.tanh(s / SOFTCAP) * SOFTCAP,
    "c * (s * (1/c)).tanh()": lambda s: SOFTCAP * (s * (1.0 / SOFTCAP)).tanh(),
}
BIAS_OPS = {
    "s + b": lambda s, b: s + b,
    "b + s": lambda s, b: b + s,
    "torch.add": lambda s, b: torch.add(s, b),
    "s += b": None,  # in place, spelled in add_bias
}
BIAS_SHAPES = {4: ("1HMN", "B11N", "11MN", "HMN", "MN", "N", "BHMN"), 3: ("ZMN", "1MN", "MN", "N"), 2: ("MN", "N")}

MASK_PATTERNS = ("causal_tril_buffer", "causal_tril", "causal_arange", "window", "band",
                 "random", "random_empty_row", "pad_right", "pad_left", "pad_all")
MASK_APPLIES = ("masked_fill", "where", "where_reversed", "masked_fill_",
                "+ zeros.masked_fill", "+ full.masked_fill_", "+ (1 - keep) * fill", "+ triu(full)")
MASK_FILLS = ("-inf", "min", "-1e4", "-1e9")
ADDITIVE = ("+ zeros.masked_fill", "+ full.masked_fill_", "+ (1 - keep) * fill", "+ triu(full)")

def _below_fp64(s: torch.Tensor) -> bool:
    """Whether an upcast to float32 is one: in the float64 reference run it would be a downcast,
    and the reference would round the scores to fp32 where the program's own dtype does not
    (scores offset by a -1e4 mask then round to 2^-10 in the reference and in eager alike, and
    any other fp32 arithmetic, fusepass's included, looks 100x worse than eager).  Dynamo
    specializes on the dtype, so the compiled programs still trace the cast as written."""
    return s.dtype != torch.float64


_NN_SOFTMAX = nn.Softmax(dim=-1)
SOFTMAXES = {
    "F.softmax": lambda s, q: F.softmax(s, dim=-1),
    "torch.softmax": lambda s, q: torch.softmax(s, -1),
    "Tensor.softmax": lambda s, q: s.softmax(dim=-1),
    "nn.Softmax": lambda s, q: _NN_SOFTMAX(s),
    "dim=s.dim()-1": lambda s, q: F.softmax(s, dim=s.dim() - 1),
    "dtype=float32 .to(q.dtype)": lambda s, q: (F.softmax(s, dim=-1, dtype=torch.float32) if _below_fp64(s)
                                               else F.softmax(s, dim=-1)).to(q.dtype),
    ".float() .type_as(q)": lambda s, q: F.softmax(s.float() if _below_fp64(s) else s, dim=-1).type_as(q),
    ".float() .to(q.dtype)": lambda s, q: torch.softmax(s.float() if _below_fp64(s) else s, -1).to(q.dtype),
}
_NN_DROPOUT_0 = nn.Dropout(0.0)
_NN_DROPOUT_EVAL = nn.Dropout(P_EVAL_DROPOUT).eval()
DROPOUTS = {
    "F.dropout(p=0.0)": lambda p: F.dropout(p, p=0.0, training=True),
    "nn.Dropout(0.0)": lambda p: _NN_DROPOUT_0(p),
    "F.dropout(training=False)": lambda p: F.dropout(p, P_EVAL_DROPOUT, training=False),
    "nn.Dropout eval": lambda p: _NN_DROPOUT_EVAL(p),
}
NEAR_MISSES = (
    "softmax dim=-2", "softmax over another axis", "weights returned", "weights in loss", "scores returned",
    "p * 2", "p.exp()", "mask after softmax", "s.exp()",
)
INPLACE = ("counter", "input.add_", "kv_cache[slice]", "kv_cache.index_copy_", "q.mul_")


# ---------------------------------------------------------------- drawing a program
def draw_shape(choose: Choose, prof: Profile, rank: int, kv_cache: bool) -> dict:
    B, H = (1, 1) if rank == 2 else (choose("B", prof.batch), choose("H", prof.heads))
    D = choose("D", prof.head_dim)
    Dv = choose("Dv", ("=D",) + prof.head_dim)
    M = choose("M", prof.seq)
    if kv_cache:
        past = choose("past", prof.seq)
        return dict(B=B, H=H, M=M, N=past + M, past=past, D=D, Dv=D if Dv == "=D" else Dv)
    N = choose("N", ("=M",) + prof.seq)
    return dict(B=B, H=H, M=M, N=M if N == "=M" else N, D=D, Dv=D if Dv == "=D" else Dv)


def draw_gqa(choose: Choose, rank: int, H: int) -> dict:
    """repeat_kv / repeat_interleave on a head-major 4-D K and V."""
    groups = [g for g in (2, 4) if H % g == 0 and g <= H]
    if rank != 4 or not groups or not choose("gqa?", (False, True)):
        return {}
    return dict(gqa=choose("gqa", ("repeat_kv", "repeat_interleave")), groups=choose("groups", groups))


def draw_contractions(choose: Choose, rank: int, head_major_kv: bool) -> dict:
    """Q·Kᵀ and P·V spellings, and the storage layouts they read."""
    mm = ["@", "torch.matmul", "Tensor.matmul"] + (["torch.bmm"] if rank == 3 else [])
    qk = choose("qk", mm + (list(BADDBMMS) if rank == 3 else []) + ["einsum", "einsum"])
    out: dict = dict(qk=qk)
    letters = choose("einsum letters", RENAMINGS)
    rename = str.maketrans("bhijd", letters)
    pv_options = EINSUM_PV[rank]
    if qk == "einsum":
        options = [o for o in EINSUM_QK[rank] if not head_major_kv or o[2] == "bhnd"]
        eq, out["q_store"], out["k_store"] = choose("qk_eq", options)
        out["qk_eq"], out["k_form"] = eq.translate(rename), ""
        if out["q_store"] == "bnhd":  # token-major code stays token-major: P·V by einsum, output too
            pv_options = [o for o in pv_options if o[1] == "bnhd"]
            out["pv"] = "einsum"
    else:
        forms = [f for f, (store, ranks, _) in K_FORMS.items() if rank in ranks and (store == "bhnd" or not head_major_kv)]
        out["k_form"] = choose("k_form", forms)
        out["k_store"] = K_FORMS[out["k_form"]][0]
    out["pv"] = pv = out.get("pv") or choose("pv", mm + ["einsum"])
    if pv == "einsum":
        options = [o for o in pv_options if not head_major_kv or o[1] == "bhnd"]
        eq, out["v_store"], out["out_store"] = choose("pv_eq", options)
        out["pv_eq"] = eq.translate(rename)
    return out


def draw_scale(choose: Choose, qk: str, source: str, inplace: str) -> dict:
    if inplace == "q.mul_":
        return dict(scale="q.mul_")
    options = [s for s in SCALES if s not in ("q.mul_", "baddbmm alpha")]
    if qk.startswith("baddbmm"):
        options = ["baddbmm alpha"] * 4 + options  # the spelling baddbmm code uses most
    scale = choose("scale", options)
    if "0-d tensor" in scale:
        return dict(scale=scale, scale_dtype=choose("scale_dtype", ("", "float32", "bfloat16", "float16")))
    return dict(scale=scale)


def draw_bias(choose: Choose, rank: int, qk: str, inplace: str) -> dict:
    kinds = ("param", "input", "input_grad")
    if inplace == "input.add_":
        kind = "input"
    elif qk == "baddbmm(bias, beta=1)":
        kind = choose("bias", kinds)
    elif not choose("bias?", (False, False, True)):
        return {}
    else:
        kind = choose("bias", kinds)
    if qk == "baddbmm(bias, beta=1)":  # the addend is the bias: batch-shaped like the scores
        return dict(bias=kind, bias_shape=choose("bias_shape", ("ZMN", "1MN", "MN")), bias_op="")
    return dict(bias=kind, bias_shape=choose("bias_shape", BIAS_SHAPES[rank]), bias_op=choose("bias_op", list(BIAS_OPS)))


def draw_mask(choose: Choose, dtype: str) -> str:
    pattern = choose("mask pattern", MASK_PATTERNS)
    applies = [a for a in MASK_APPLIES if a != "+ triu(full)" or pattern in ("causal_tril", "causal_tril_buffer")]
    apply = choose("mask apply", applies)
    fills = [f for f in MASK_FILLS if not (f == "-1e9" and dtype == "float16")
             and not (f == "-inf" and apply == "+ (1 - keep) * fill")]  # 0 * -inf is NaN
    return f"{pattern}/{apply}/{choose('mask fill', fills)}"


def draw_masks(choose: Choose, dtype: str) -> dict:
    count = choose("masks", (0, 1, 1, 2))
    return dict(masks=tuple(draw_mask(choose, dtype) for _ in range(count)))


def draw_softcap(choose: Choose) -> dict:
    return dict(softcap=choose("softcap", ("", "", "") + tuple(SOFTCAPS)))


def draw_softmax(choose: Choose) -> dict:
    return dict(softmax=choose("softmax", list(SOFTMAXES)))


def draw_dropout(choose: Choose) -> dict:
    return dict(dropout=choose("dropout", ("", "") + tuple(DROPOUTS)))


def draw_near_miss(choose: Choose) -> dict:
    return dict(near_miss=choose("near_miss", ("",) * 27 + NEAR_MISSES))  # one program in four


def draw_inplace(choose: Choose, rank: int) -> dict:
    options = ("",) * 12 + tuple(i for i in INPLACE if rank == 4 or not i.startswith("kv_cache"))  # about one in four
    return dict(inplace=choose("inplace", options))


def generate(choose: Choose, prof: Profile = REFERENCE) -> Program:
    """One program, drawn dimension by dimension (later draws respect earlier ones)."""
    f: dict = dict(dtype=choose("dtype", prof.dtypes), rank=choose("rank", (4, 4, 3, 2)))
    f.update(draw_inplace(choose, f["rank"]))
    kv_cache = f["inplace"].startswith("kv_cache")
    if kv_cache:
        f["source"] = "leaves"
    elif f["inplace"] == "q.mul_":
        f["source"] = "proj"
    else:
        f["source"] = choose("source", ("leaves", "proj"))
    f.update(draw_shape(choose, prof, f["rank"], kv_cache))
    f.update(draw_gqa(choose, f["rank"], f["H"]))
    f.update(draw_contractions(choose, f["rank"], head_major_kv=bool(f.get("gqa")) or kv_cache))
    f.update(draw_scale(choose, f["qk"], f["source"], f["inplace"]))
    f.update(draw_softcap(choose))
    f.update(draw_bias(choose, f["rank"], f["qk"], f["inplace"]))
    f.update(draw_masks(choose, f["dtype"]))
    f.update(draw_softmax(choose))
    f.update(draw_dropout(choose))
    f.update(draw_near_miss(choose))
    f["grad"] = f["dtype"] != "float16" and choose("grad", (True, True, False))
    f["dynamic"] = choose("dynamic", (False,) * 5 + (True,))
    return Program(**f)


# ---------------------------------------------------------------- what fusepass should do
def _mask_parts(mask: str) -> tuple[str, str, str]:
    pattern, apply, fill = mask.split("/")
    return pattern, apply, fill


def inplace_inside(prog: Program) -> bool:
    """An in-place write on the scores, on q, or on a mask the scores read."""
    applies = {_mask_parts(m)[1] for m in prog.masks}
    return (prog.scale in ("s.div_", "q.mul_") or prog.bias_op == "s += b"
            or bool(applies & {"masked_fill_", "+ full.masked_fill_"}))


def expected_fusion(prog: Program) -> Optional[bool]:
    """True: real attention with supported features, must be fused; False: a near-miss, must not
    be; None: not asserted (in-place writes, or an order the matcher refuses by design: a bias
    or an additive mask after a finite fill, two fills that differ)."""
    if prog.near_miss == "scores returned":
        return None  # fusing is correct when the returned scores are the bare product (still computed)
    if prog.near_miss:
        return False
    if prog.inplace or inplace_inside(prog):
        return None
    if prog.softcap and prog.qk in ("baddbmm(zeros, beta=1)", "baddbmm(bias, beta=1)"):
        return None  # the addend is a bias: "tanh (softcap) applied after a bias"
    if prog.softcap and prog.dynamic:
        return None  # the cap is a symbolic float: "a symbolic scale is applied after ... a softcap"
    if prog.dynamic and prog.masks:
        return None  # masks sized by s.size(-2), s.size(-1): symbolic size reads of the scores are users
    if prog.dynamic and prog.dropout.startswith("nn.Dropout("):
        return None  # a training-mode module's p is a symbolic float: the op's dropout_p is a constant
    additive = sum(_mask_parts(m)[1] in ADDITIVE for m in prog.masks) + bool(prog.bias)
    if prog.dtype == "float16" and additive > 1:
        return None  # refused unless masks are lifted: eager's fp16 sum of several terms can overflow
    if prog.dtype == "float16" and any(_mask_parts(m)[1] in ADDITIVE and _mask_parts(m)[2] in ("min", "-1e4")
                                       for m in prog.masks):
        return None  # refused when kept as a bias and a row may be fully hidden: eager's fp16 sum absorbs s
    fill, finite_fill_seen = None, False
    for mask in prog.masks:
        _, apply, f = _mask_parts(mask)
        if apply in ADDITIVE:
            if finite_fill_seen:
                return None  # "a bias is added after a mask with a finite fill"
            continue
        if fill is not None and f != fill:
            return None  # "masks fill with different values"
        fill, finite_fill_seen = f, f != "-inf"
    return True


# ---------------------------------------------------------------- the module
def _fill_value(fill: str, dtype: torch.dtype) -> float:
    return {"-inf": float("-inf"), "-1e4": -1e4, "-1e9": -1e9}.get(fill) or torch.finfo(dtype).min


def _bias_size(prog: Program) -> tuple[int, ...]:
    axes = {"B": prog.B, "H": prog.H, "M": prog.M, "N": prog.N, "Z": prog.B * prog.H, "1": 1}
    return tuple(axes[a] for a in prog.bias_shape)


class AttentionProgram(nn.Module):
    """The program as a module: parameters, buffers, and a forward that spells each choice."""

    def __init__(self, prog: Program):
        super().__init__()
        self.prog = prog
        C = 12  # model width of the projections (any; not a multiple of D on purpose)
        if prog.source == "proj":
            heads = (1, 1) if prog.rank == 2 else (prog.H, prog.HKV)
            self.q_proj = nn.Linear(C, heads[0] * prog.D, bias=False)
            self.k_proj = nn.Linear(C, heads[1] * prog.D, bias=False)
            self.v_proj = nn.Linear(C, heads[1] * prog.Dv)
            self.o_proj = nn.Linear(heads[0] * prog.Dv, C)
        if prog.bias == "param":
            self.bias = nn.Parameter(0.5 * torch.randn(_bias_size(prog)))
        if any(m.startswith("causal_tril_buffer") for m in prog.masks):
            # nanoGPT's buffer: longer than the sequence, sliced per call
            L = max(prog.M, prog.N) + 3
            self.register_buffer("tril", torch.tril(torch.ones(L, L)).view((1,) * (prog.rank - 2) + (L, L)))
        if prog.inplace.startswith("kv_cache"):
            L = prog.N + 2  # the cache is longer than what is used
            self.register_buffer("k_cache", torch.randn(prog.B, prog.HKV, L, prog.D))
            self.register_buffer("v_cache", torch.randn(prog.B, prog.HKV, L, prog.Dv))
        if prog.inplace == "counter":
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, t: dict):
        p = self.prog
        before_attention(self, t)
        q, k, v = queries_keys_values(self, t)
        q, k = prescale(p, q, k)
        s = scores(p, q, k, t, self)
        s = scale_scores(p, s, q)
        s = softcap(p, s)
        s = add_bias(self, s, t)
        for mask in p.masks:
            s = apply_mask(self, s, mask, t)
        w = near_miss_on_scores(p, s)
        w = SOFTMAXES[p.softmax](w, q) if not p.near_miss.startswith("softmax") else near_miss_softmax(p, w)
        w = DROPOUTS[p.dropout](w) if p.dropout else w
        w = near_miss_on_weights(p, w)
        out = weighted_values(p, w, v)
        return finish(self, out, w, s)


# ---------------------------------------------------------------- forward, one dimension each
def before_attention(mod: AttentionProgram, t: dict) -> None:
    """In-place writes before the attention that the compiled program must keep."""
    if mod.prog.inplace == "counter":
        mod.calls.add_(1)
    elif mod.prog.inplace == "input.add_":
        t["bias"].add_(0.5)


def _heads_from_tokens(x: torch.Tensor, prog: Program, heads: int, dim: int, store: str) -> torch.Tensor:
    """A projection's output [B, L, heads * dim] (rank 2: [L, dim]) viewed in ``store`` layout."""
    if prog.rank == 2:
        return x.t() if store == "bhdn" else x
    y = x.view(prog.B, x.size(1), heads, dim)  # [B, L, h, d]
    if prog.rank == 3:
        y = y.transpose(1, 2).reshape(prog.B * heads, x.size(1), dim)
        return y.transpose(1, 2) if store == "bhdn" else y
    return {"bnhd": y, "bhnd": y.transpose(1, 2), "bhdn": y.permute(0, 2, 3, 1)}[store]


def queries_keys_values(mod: AttentionProgram, t: dict):
    """q, k, v in their storage layouts; K and V repeated for GQA; a KV cache written first."""
    p = mod.prog
    if p.source == "proj":
        q = mod.q_proj(t["x"])
        if p.scale == "q.mul_":
            q.mul_(p.scale_value)  # fairseq: q *= self.scaling on the projection's output
        q = _heads_from_tokens(q, p, p.H, p.D, p.q_store)
        k = _heads_from_tokens(mod.k_proj(t["y"]), p, p.HKV, p.D, p.k_store)
        v = _heads_from_tokens(mod.v_proj(t["y"]), p, p.HKV, p.Dv, p.v_store)
    else:
        q, k, v = t["q"], t["k"], t["v"]
    if p.inplace == "kv_cache[slice]":
        mod.k_cache[:, :, p.past:p.N] = k
        mod.v_cache[:, :, p.past:p.N] = v
        k, v = mod.k_cache[:, :, :p.N], mod.v_cache[:, :, :p.N]
    elif p.inplace == "kv_cache.index_copy_":
        positions = torch.arange(p.past, p.N, device=q.device)
        mod.k_cache.index_copy_(2, positions, k)
        mod.v_cache.index_copy_(2, positions, v)
        k, v = mod.k_cache[:, :, :p.N], mod.v_cache[:, :, :p.N]
    if p.gqa == "repeat_kv":
        k, v = repeat_kv(k, p.groups), repeat_kv(v, p.groups)
    elif p.gqa == "repeat_interleave":
        k, v = k.repeat_interleave(p.groups, dim=1), v.repeat_interleave(p.groups, dim=1)
    return q, k, v


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, HKV, N, D] -> [B, HKV * n_rep, N, D]."""
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def prescale(p: Program, q: torch.Tensor, k: torch.Tensor):
    if p.scale == "q pre-scaled":
        return q * p.scale_value, k
    if p.scale == "k pre-scaled":
        return q, k * p.scale_value
    if p.scale == "q and k split":
        return q * p.scale_value ** 0.5, k * p.scale_value ** 0.5
    return q, k


def scores(p: Program, q: torch.Tensor, k: torch.Tensor, t: dict, mod: AttentionProgram) -> torch.Tensor:
    """Q·Kᵀ: [B, H, M, N] (rank 3: [B*H, M, N], rank 2: [M, N])."""
    if p.qk == "einsum":
        return torch.einsum(p.qk_eq, q, k)
    kt = K_FORMS[p.k_form][2](k)
    if p.qk.startswith("baddbmm"):
        alpha = p.scale_value if p.scale == "baddbmm alpha" else 1.0
        shape = (q.size(0), q.size(1), kt.size(2))
        if p.qk == "baddbmm(empty, beta=0)":
            return torch.baddbmm(torch.empty(shape, dtype=q.dtype, device=q.device), q, kt, beta=0.0, alpha=alpha)
        if p.qk == "baddbmm(zeros, beta=1)":
            return torch.baddbmm(torch.zeros(shape, dtype=q.dtype, device=q.device), q, kt, beta=1.0, alpha=alpha)
        return torch.baddbmm(_bias_tensor(mod, t), q, kt, beta=1.0, alpha=alpha)
    return MATMULS[p.qk](q, kt)


def scale_scores(p: Program, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    d = p.D
    if p.scale == "/ math.sqrt(d)":
        return s / math.sqrt(d)
    if p.scale == "/ math.sqrt(q.size(-1))":
        return s / math.sqrt(q.size(-1))  # q's last axis is D in every layout q is stored in
    if p.scale == "* d**-0.5":
        return s * d ** -0.5
    if p.scale in ("* 0-d tensor", "/ 0-d tensor"):
        dtype = DTYPES[p.scale_dtype] if p.scale_dtype else s.dtype
        if p.scale == "* 0-d tensor":
            return s * torch.tensor(p.scale_value, dtype=dtype, device=s.device)
        return s / torch.full((), math.sqrt(d), dtype=dtype, device=s.device)
    if p.scale == "s.div_":
        s.div_(math.sqrt(d))
        return s
    return s


def softcap(p: Program, s: torch.Tensor) -> torch.Tensor:
    return SOFTCAPS[p.softcap](s) if p.softcap else s


def _bias_tensor(mod: AttentionProgram, t: dict) -> torch.Tensor:
    return mod.bias if mod.prog.bias == "param" else t["bias"]


def add_bias(mod: AttentionProgram, s: torch.Tensor, t: dict) -> torch.Tensor:
    p = mod.prog
    if not p.bias or p.qk == "baddbmm(bias, beta=1)":
        return s
    b = _bias_tensor(mod, t)
    if p.bias_op == "s += b":
        s += b
        return s
    return BIAS_OPS[p.bias_op](s, b)


def _positions(s: torch.Tensor, offset: int = 0):
    M, N = s.size(-2), s.size(-1)
    i = torch.arange(M, device=s.device).view(M, 1) + offset
    j = torch.arange(N, device=s.device).view(1, N)
    return i, j


def _padding_keep(p: Program, am: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, N] (1 = token) as a keep mask that broadcasts against the scores."""
    if p.rank == 4:
        return am[:, None, None, :].bool()
    if p.rank == 3:
        return am.repeat_interleave(p.H, dim=0)[:, None, :].bool()
    return am.bool()  # [1, N]


def mask_keep(mod: AttentionProgram, pattern: str, s: torch.Tensor, t: dict) -> torch.Tensor:
    """True (or nonzero) where a key is visible."""
    p = mod.prog
    if pattern == "causal_tril_buffer":
        return mod.tril[..., : s.size(-2), : s.size(-1)]  # float ones / zeros, as nanoGPT
    if pattern == "causal_tril":
        return torch.tril(torch.ones(s.size(-2), s.size(-1), dtype=torch.bool, device=s.device))
    if pattern == "causal_arange":  # aligned bottom-right: the queries are the last M positions
        i, j = _positions(s, offset=s.size(-1) - s.size(-2))
        return i >= j
    if pattern == "window":
        i, j = _positions(s)
        return (i - j < WINDOW) & (j <= i)
    if pattern == "band":
        i, j = _positions(s)
        return torch.abs(i - j) <= BAND
    if pattern.startswith("random"):
        return t["keep_" + pattern]
    return _padding_keep(p, t["attention_mask_" + pattern])


def apply_mask(mod: AttentionProgram, s: torch.Tensor, mask: str, t: dict) -> torch.Tensor:
    pattern, apply, fill_name = _mask_parts(mask)
    keep = mask_keep(mod, pattern, s, t)
    visible = keep if keep.dtype == torch.bool else keep != 0
    hidden = ~keep if keep.dtype == torch.bool else keep == 0
    # NOTE: "min" is torch.finfo of the program's dtype, as models write it (torch.finfo(s.dtype)
    # in the program's own dtype); the float64 run keeps that constant, so that it computes the
    # same program exactly.  (With float64's own min, a fully masked float16 row would be uniform
    # in the reference but softmax(s) for fp16's -65504 computed exactly.)
    fill = _fill_value(fill_name, mod.prog.torch_dtype)
    if apply == "masked_fill":
        return s.masked_fill(hidden, fill)
    if apply == "where":
        return torch.where(visible, s, fill)
    if apply == "where_reversed":
        return torch.where(hidden, fill, s)
    if apply == "masked_fill_":
        s.masked_fill_(hidden, fill)
        return s
    if apply == "+ zeros.masked_fill":
        return s + torch.zeros(keep.shape, dtype=s.dtype, device=s.device).masked_fill(hidden, fill)
    if apply == "+ full.masked_fill_":
        m = torch.full(keep.shape, fill, dtype=s.dtype, device=s.device)
        m.masked_fill_(visible, 0.0)
        return s + m
    if apply == "+ (1 - keep) * fill":
        return s + (1.0 - visible.to(s.dtype)) * fill
    if apply == "+ triu(full)":  # Llama's original causal mask
        return s + torch.triu(torch.full((s.size(-2), s.size(-1)), fill, dtype=s.dtype, device=s.device), diagonal=1)
    raise ValueError(apply)


def near_miss_on_scores(p: Program, s: torch.Tensor) -> torch.Tensor:
    return s.exp() if p.near_miss == "s.exp()" else s


def near_miss_softmax(p: Program, s: torch.Tensor) -> torch.Tensor:
    if p.near_miss == "softmax dim=-2":
        return F.softmax(s, dim=-2)
    return F.softmax(s, dim=1 if s.dim() == 4 else 0)  # heads (rank 4), batch (3), queries (2)


def near_miss_on_weights(p: Program, w: torch.Tensor) -> torch.Tensor:
    if p.near_miss == "p * 2":
        return w * 2
    if p.near_miss == "p.exp()":
        return w.exp()
    if p.near_miss == "mask after softmax":
        return w.masked_fill(~torch.tril(torch.ones(w.size(-2), w.size(-1), dtype=torch.bool, device=w.device)), 0.0)
    return w


def weighted_values(p: Program, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if p.pv == "einsum":
        return torch.einsum(p.pv_eq, w, v)
    return MATMULS[p.pv](w, v)


def finish(mod: AttentionProgram, out: torch.Tensor, w: torch.Tensor, s: torch.Tensor):
    p = mod.prog
    if p.source == "proj":
        if p.rank == 4:
            tokens = out if p.out_store == "bnhd" else out.transpose(1, 2)  # [B, M, H, Dv]
            out = mod.o_proj(tokens.reshape(p.B, p.M, p.H * p.Dv))
        elif p.rank == 3:
            out = mod.o_proj(out.view(p.B, p.H, p.M, p.Dv).transpose(1, 2).reshape(p.B, p.M, p.H * p.Dv))
        else:
            out = mod.o_proj(out)
    if p.near_miss == "weights returned":
        return out, w
    if p.near_miss == "weights in loss":
        return out, (w * w).sum()
    if p.near_miss == "scores returned":
        return out, s
    return out


# ---------------------------------------------------------------- inputs
def _store(x: torch.Tensor, prog: Program, store: str) -> torch.Tensor:
    """A logical [B, h, L, d] tensor stored contiguously in ``store`` layout at the program's rank."""
    if prog.rank == 4:
        y = {"bhnd": x, "bhdn": x.transpose(-2, -1), "bnhd": x.permute(0, 2, 1, 3)}[store]
    elif prog.rank == 3:
        y = x.reshape(-1, *x.shape[2:])
        y = y.transpose(-2, -1) if store == "bhdn" else y
    else:
        y = x[0, 0].t() if store == "bhdn" else x[0, 0]
    return y.contiguous()


def _scores_shaped(x: torch.Tensor, prog: Program) -> torch.Tensor:
    """A [B, 1, M, N] tensor as the scores of the program's rank broadcast it."""
    if prog.rank == 4:
        return x
    if prog.rank == 3:
        return x.expand(prog.B, prog.H, *x.shape[2:]).reshape(prog.B * prog.H, *x.shape[2:]).contiguous()
    return x[0, 0].contiguous()


def make_inputs(prog: Program, device: str = "cpu", seed: int = 0) -> dict:
    """The program's inputs, drawn in float64 and rounded to the program's dtype."""
    g = torch.Generator().manual_seed(seed)
    dtype, grad = prog.torch_dtype, prog.grad

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t: dict = {}
    M_new = prog.M  # a KV cache program gets only the new keys
    kv_len = prog.M if prog.inplace.startswith("kv_cache") else prog.N
    if prog.source == "proj":
        lead = () if prog.rank == 2 else (prog.B,)
        t["x"], t["y"] = rand(*lead, prog.M, 12), rand(*lead, prog.N, 12)
    else:
        t["q"] = _store(rand(prog.B, prog.H, M_new, prog.D), prog, prog.q_store)
        t["k"] = _store(rand(prog.B, prog.HKV, kv_len, prog.D), prog, prog.k_store)
        t["v"] = _store(rand(prog.B, prog.HKV, kv_len, prog.Dv), prog, prog.v_store)
    for name in list(t):
        t[name] = t[name].to(device, dtype).requires_grad_(grad)
    if prog.bias in ("input", "input_grad"):
        t["bias"] = (0.5 * rand(*_bias_size(prog))).to(device, dtype).requires_grad_(prog.bias == "input_grad" and grad)
    M, N = prog.M, prog.N
    for mask in prog.masks:
        pattern = _mask_parts(mask)[0]
        if pattern.startswith("random"):
            keep = torch.rand(prog.B, 1, M, N, generator=g) > 0.3
            keep[..., 0] |= ~keep.any(-1)  # every row sees a key ...
            if pattern == "random_empty_row":
                keep[0, :, M // 2, :] = False  # ... except one
            t["keep_" + pattern] = _scores_shaped(keep, prog).to(device)
        elif pattern.startswith("pad"):
            am = torch.ones(prog.B, N, dtype=torch.long)
            pads = min(3, N - 1) if N > 1 else 0
            if pattern == "pad_right" and pads:
                am[-1, N - pads:] = 0  # the last sequence has padded keys at its end
            elif pattern == "pad_left" and pads:
                am[0, :pads] = 0  # the first sequence is left-padded (generation)
            elif pattern == "pad_all":
                am[0] = 0  # the first sequence is all padding: every row of it sees no key
            t["attention_mask_" + pattern] = (am[:1] if prog.rank == 2 else am).to(device)
    return t


# ---------------------------------------------------------------- the differential check
class ProgramFailure(AssertionError):
    """A program whose compiled run disagrees with eager; ``kind`` groups failures."""

    def __init__(self, kind: str, prog: Program, detail: str):
        super().__init__(f"[{kind}] {prog}\n{detail}")
        self.kind, self.prog, self.detail = kind, prog, detail


@dataclasses.dataclass
class Run:
    outputs: list  # every output tensor, detached
    grads: dict  # "input q" / "param bias" -> gradient
    state: dict  # "buffer k_cache" / "input bias" -> value after the call


def execute(fn: Callable, module: nn.Module, t: dict) -> Run:
    out = fn(t)
    outs = list(out) if isinstance(out, tuple) else [out]
    loss = sum(projection_loss(o, 1234 + n) for n, o in enumerate(outs))
    if loss.requires_grad:
        loss.backward()
    grads = {f"input {n}": x.grad for n, x in t.items() if x.grad is not None}
    grads.update({f"param {n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    state = {f"buffer {n}": b.detach().clone() for n, b in module.named_buffers()}
    state.update({f"input {n}": x.detach().clone() for n, x in t.items() if not x.requires_grad})
    return Run([o.detach() for o in outs], grads, state)


FLOORS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # conftest's floors
FACTOR = 4.0  # the fused error may be this many times eager's own error (conftest's rule)


def compare(name: str, got: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor) -> Optional[tuple[str, str]]:
    """None, or (kind, detail).  NaN and ±inf exactly where eager has them; elsewhere the error
    against float64 at most FACTOR x eager's own plus a floor."""
    if got.shape != eager.shape:
        return "shape", f"{name}: shape {tuple(got.shape)} vs eager {tuple(eager.shape)}"
    if got.dtype != eager.dtype:
        return "dtype", f"{name}: dtype {got.dtype} vs eager {eager.dtype}"
    g, e, r = got.double(), eager.double(), ref.double()
    nan_g, nan_e = torch.isnan(g), torch.isnan(e)
    # A NaN of eager's that float64 does not have is eager's own (torch's CPU bf16 matmul
    # spreads a NaN row of P into its neighbour row): there the fused value must follow float64.
    genuine = nan_e & torch.isnan(r)
    if (nan_g & ~nan_e).any() or (genuine & ~nan_g).any():
        extra, missing = (nan_g & ~nan_e).sum().item(), (genuine & ~nan_g).sum().item()
        return "NaN pattern", f"{name}: {extra} NaN where eager is finite, {missing} finite where eager is NaN (of {g.numel()})"
    nan_g, nan_e = nan_g & genuine, genuine
    inf_e = torch.isinf(e)
    if not torch.equal(torch.isinf(g), inf_e) or not torch.equal(g[inf_e], e[inf_e]):
        return "inf pattern", f"{name}: infinities differ from eager"
    finite = torch.isfinite(e) & torch.isfinite(r)
    checked = torch.isfinite(r) & ~nan_e  # eager's own NaNs included: the fused value is checked there
    if not checked.any():
        return None
    fused_err = (g - r)[checked].abs().max().item()
    eager_err = (e - r)[finite].abs().max().item() if finite.any() else 0.0
    bound = FACTOR * eager_err + FLOORS[eager.dtype]
    if fused_err > bound:
        where = ((g - r).abs() * checked).nan_to_num(0.0).flatten().argmax().item()
        return "mismatch", (f"{name}: error {fused_err:.3e} vs float64 exceeds {FACTOR:g} x eager's {eager_err:.3e} + "
                            f"{FLOORS[eager.dtype]:.0e}; at flat index {where}: got {g.flatten()[where].item():.6g}, "
                            f"eager {e.flatten()[where].item():.6g}, float64 {r.flatten()[where].item():.6g}")
    return None


def _compile_and_run(prog: Program, module: nn.Module, t: dict, options: dict, backend: str = "fusepass") -> tuple[Run, dict]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters["fusepass"].clear()
    kwargs = dict(backend=backend, options=options) if backend == "fusepass" else dict(backend=backend)
    compiled = torch.compile(module, dynamic=True if prog.dynamic else None, **kwargs)
    run = execute(compiled, module, t)
    return run, dict(counters["fusepass"])


def build(prog: Program, device: str = "cpu") -> tuple[nn.Module, dict]:
    torch.manual_seed(0)  # the projections' initialization
    module = AttentionProgram(prog).to(device=device, dtype=prog.torch_dtype)
    if prog.grad is False:
        module.requires_grad_(False)
    return module, make_inputs(prog, device)


def check_program(prog: Program, options: dict, device: str = "cpu", expected: Any = "auto") -> dict:
    """Eager vs fusepass vs float64 eager on one program; returns fusepass's counters.

    ``expected`` overrides ``expected_fusion(prog)`` (True: must be fused, False: must not be,
    None: not checked).

    Raises ProgramFailure.  Failures of the compiled run are re-tried with fuse=False, so a
    failure that is torch's (or the program's) and not fusepass's is labeled as such.
    """
    module, t = build(prog, device)
    m_eager = copy.deepcopy(module)
    eager = execute(m_eager, m_eager, fresh_leaves(t))
    m_ref = copy.deepcopy(module).double()
    ref = execute(m_ref, m_ref, fresh_leaves(t, torch.float64))
    m_got = copy.deepcopy(module)
    try:
        got, fusepass_counters = _compile_and_run(prog, m_got, fresh_leaves(t), options)
    except Exception as exc:  # noqa: BLE001 - any crash of the compiled program is a finding
        lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith(("Set TORCH", "While executing"))]
        first = " | ".join(lines[:3])[:600]
        kind = f"crash {type(exc).__name__}"
        if DIAGNOSE and _fails_without_fusion(prog, module, t, options):
            kind = f"fails under {options.get('inner', 'inductor')} alone too: " + kind
        raise ProgramFailure(kind, prog, f"{type(exc).__name__}: {first}") from exc

    problems = _differences(got, eager, ref)
    expected = expected_fusion(prog) if expected == "auto" else expected
    fused = fusepass_counters.get("attention_fused", 0)
    # Dynamo may compile a program twice (a recompile on a guard): every graph must fuse its site.
    if expected is True and (fused < 1 or fusepass_counters.get("attention_rejected", 0)):
        problems.append(("not fused", f"expected fused sites and none rejected, counters {fusepass_counters}; "
                                      f"{_why(prog, module, t, options)}"))
    if expected is False and fused:
        problems.append(("near-miss fused", f"a near-miss was fused: counters {fusepass_counters}"))
    if problems:
        kind = problems[0][0]
        if DIAGNOSE and kind not in ("not fused", "near-miss fused") and _fails_without_fusion(prog, module, t, options):
            kind = f"fails under {options.get('inner', 'inductor')} alone too: " + kind
        raise ProgramFailure(kind, prog, "\n".join(f"  {k}: {d}" for k, d in problems) + f"\n  counters {fusepass_counters}")
    return fusepass_counters


def _differences(got: Run, eager: Run, ref: Run) -> list[tuple[str, str]]:
    problems = []
    if len(got.outputs) != len(eager.outputs):
        return [("outputs", f"{len(got.outputs)} outputs vs eager {len(eager.outputs)}")]
    for n, (a, e, r) in enumerate(zip(got.outputs, eager.outputs, ref.outputs)):
        if (bad := compare(f"output {n}", a, e, r)) is not None:
            problems.append(bad)
    if set(got.grads) != set(eager.grads):
        problems.append(("gradients missing", f"gradients of {sorted(got.grads)} vs eager {sorted(eager.grads)}"))
    for name in sorted(set(got.grads) & set(eager.grads)):
        if (bad := compare(f"grad {name}", got.grads[name], eager.grads[name], ref.grads[name])) is not None:
            problems.append((f"grad {bad[0]}", bad[1]))
    for name, want in eager.state.items():
        have = got.state[name]
        same = have.shape == want.shape and (torch.equal(have, want) or (
            have.is_floating_point() and torch.equal(torch.isnan(have), torch.isnan(want))
            and torch.equal(have.nan_to_num(), want.nan_to_num())))
        if not same:
            problems.append(("mutation lost", f"{name} after the call differs from eager's"))
    return problems


def _fails_without_fusion(prog: Program, module: nn.Module, t: dict, options: dict) -> bool:
    """Whether the program fails the same check compiled by the inner compiler alone (no fusepass)."""
    m_eager = copy.deepcopy(module)
    eager = execute(m_eager, m_eager, fresh_leaves(t))
    m_ref = copy.deepcopy(module).double()
    ref = execute(m_ref, m_ref, fresh_leaves(t, torch.float64))
    try:
        m = copy.deepcopy(module)
        run, _ = _compile_and_run(prog, m, fresh_leaves(t), {}, backend=options.get("inner", "inductor"))
    except Exception:  # noqa: BLE001
        return True
    return bool(_differences(run, eager, ref))


def _why(prog: Program, module: nn.Module, t: dict, options: dict) -> str:
    """The reasons explain gives for the program's sites (only computed on a failure)."""
    import torch._dynamo

    import fusepass

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(assume_static_by_default=not prog.dynamic):
            report = fusepass.explain(copy.deepcopy(module), fresh_leaves(t), options=options)
    except Exception as exc:  # noqa: BLE001
        return f"explain raised {type(exc).__name__}: {exc}"
    return "; ".join(f"{s.location}: {'fused' if s.fused else s.reason}" for s in report.sites) or "no attention site found"
