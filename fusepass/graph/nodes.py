"""Normalize: read the many spellings Dynamo hands us into one small vocabulary.

Dynamo's graphs are torch-level: the same operation appears as a function
(``torch.matmul``, ``operator.matmul``), a method (``call_method 'matmul'``) or an inlined
module (``nn.Softmax`` becomes ``F.softmax``).  Every reader here takes a node and returns
its meaning, or None when the node is something else.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F


def fake(node: Any) -> Optional[torch.Tensor]:
    """The example (fake) tensor Dynamo recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    ev = node.meta.get("example_value", node.meta.get("val"))
    return ev if isinstance(ev, torch.Tensor) else None


def is_call(node: Any, *targets: Any, methods: tuple[str, ...] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return node.op == "call_method" and node.target in methods


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def self_arg(node: fx.Node) -> Any:
    """The tensor a function or method applies to (``x`` in ``x.f()`` and ``torch.f(x)``)."""
    return node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))


# ---------------------------------------------------------------- scalars
_FULL_LIKE = (torch.full, torch.tensor, torch.scalar_tensor, torch.as_tensor)


def scalar_value(x: Any) -> Optional[float]:
    """A Python number, or a 0-d constant tensor built in the graph (``torch.full([], s)``)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node) or x.op != "call_function" or x.target not in _FULL_LIKE:
        return None
    if x.target is torch.full:
        size, value = arg(x, 0, "size"), arg(x, 1, "fill_value")
        if not isinstance(size, (tuple, list)) or tuple(size) != ():  # a shape node is not 0-d
            return None
    else:
        value = arg(x, 0, "data" if x.target is not torch.scalar_tensor else "s")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Eager multiplies by the value as stored: torch.tensor(0.3, dtype=torch.bfloat16) is 0.30078125.
        ev = fake(x)
        return stored_as(value, ev.dtype) if ev is not None else float(value)
    return None


def stored_as(value: float, dtype: Optional[torch.dtype]) -> float:
    """``value`` as a tensor of ``dtype`` holds it (-1e4 in bfloat16 is -9984)."""
    if dtype is None or not dtype.is_floating_point:
        return float(value)
    return float(torch.tensor(value, dtype=dtype).item())


def symbolic_scalar(x: Any) -> Optional[fx.Node]:
    """A node holding a symbolic Python number (``self.scaling`` once Dynamo made it dynamic)."""
    if not isinstance(x, fx.Node):
        return None
    ev = x.meta.get("example_value", x.meta.get("val"))
    return x if isinstance(ev, (torch.SymFloat, torch.SymInt)) else None


def size_hint(size: Any) -> int:
    """A size as an int: itself, or a symbolic size's value in the example Dynamo traced."""
    return size if isinstance(size, int) else int(size.node.hint)


def symbolic_hint(node: fx.Node) -> float:
    ev = node.meta.get("example_value", node.meta.get("val"))
    return float(ev.node.hint)


def describe(node: fx.Node) -> str:
    """``call_method masked_fill_``: the op of a node, for refusal reasons."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def is_tensor_node(x: Any) -> bool:
    return isinstance(x, fx.Node) and fake(x) is not None and scalar_value(x) is None


# ---------------------------------------------------------------- softmax
class Softmax(NamedTuple):
    input: fx.Node
    dim: int


def softmax(node: fx.Node) -> Optional[Softmax]:
    if not is_call(node, F.softmax, torch.softmax, torch.Tensor.softmax, methods=("softmax",)):
        return None
    dim = arg(node, 1, "dim")
    x = self_arg(node)
    ev = fake(x)
    if not isinstance(dim, int) or ev is None:
        return None
    return Softmax(x, dim % ev.dim())


# ---------------------------------------------------------------- casts
_CAST_METHODS = ("float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous")


def cast_input(node: fx.Node) -> Optional[fx.Node]:
    """The input of a dtype cast (or a layout-only op such as contiguous), else None.

    ``.to(device)`` or ``.to(other_tensor)`` moving devices is not a cast: we check that the
    result lives on the same device with the same shape.
    """
    if not is_call(node, torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as, methods=_CAST_METHODS):
        return None
    x = self_arg(node)
    before, after = fake(x), fake(node)
    if before is None or after is None:
        return None
    if before.device != after.device or tuple(before.shape) != tuple(after.shape):
        return None
    if not after.dtype.is_floating_point:
        return None
    return x


# ---------------------------------------------------------------- scalar multiply / divide
class SymbolicFactor(NamedTuple):
    """A factor known only at run time: ``node ** power`` (power 1 for *, -1 for /)."""

    node: fx.Node
    power: int

    def hint(self) -> float:
        return symbolic_hint(self.node) ** self.power


def _factor(x: Any, power: int):
    c = scalar_value(x)
    if c is not None:
        return c if power == 1 else (1.0 / c if c != 0 else None)
    sym = symbolic_scalar(x)
    return SymbolicFactor(sym, power) if sym is not None else None


def scalar_scale(node: fx.Node) -> Optional[tuple[fx.Node, Any]]:
    """``x * c``, ``c * x``, ``x / c``, ``torch.mul/div``, ``x.mul(c)``: (x, factor) for scalar c.

    The factor is a float, or a ``SymbolicFactor`` when c is a symbolic number.
    """
    if is_call(node, operator.mul, torch.mul, torch.Tensor.mul, operator.imul, methods=("mul", "mul_")):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if is_tensor_node(a) and (f := _factor(b, 1)) is not None:
            return a, f
        if is_tensor_node(b) and (f := _factor(a, 1)) is not None:
            return b, f
        return None
    if is_call(node, operator.truediv, torch.div, torch.true_divide, torch.Tensor.div, operator.itruediv,
               methods=("div", "div_", "true_divide")):
        if node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if is_tensor_node(a) and (f := _factor(b, -1)) is not None:
            return a, f
    return None


# ---------------------------------------------------------------- additions
def tensor_add(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, float]]:
    """``a + b``, ``a += b``, ``a - b``, ``torch.add(a, b, alpha=)``: (a, b, coefficient of b)."""
    if is_call(node, operator.add, operator.iadd, torch.add, torch.Tensor.add, methods=("add", "add_")):
        sign = 1.0
    elif is_call(node, operator.sub, operator.isub, torch.sub, torch.Tensor.sub, methods=("sub", "sub_")):
        sign = -1.0
    else:
        return None
    if len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    if not (is_tensor_node(a) and is_tensor_node(b)):
        return None
    return a, b, sign * float(alpha)


# ---------------------------------------------------------------- masks
class MaskOp(NamedTuple):
    scores: fx.Node
    cond: fx.Node
    keep_when: bool  # the scores are kept where cond == keep_when
    fill: float


def mask_op(node: fx.Node) -> Optional[MaskOp]:
    """``s.masked_fill(cond, v)`` and ``torch.where(cond, s, v)`` / ``torch.where(cond, v, s)``.

    The fill is the value as the result stores it: eager's bfloat16 scores hold -1e4 as -9984,
    and a bias or additive mask beside it (kept as a tensor) competes with that value.
    """
    op = _mask_op(node)
    if op is None:
        return None
    ev = fake(node)
    return op._replace(fill=stored_as(op.fill, ev.dtype if ev is not None else None))


def _mask_op(node: fx.Node) -> Optional[MaskOp]:
    if is_call(node, torch.masked_fill, torch.Tensor.masked_fill, methods=("masked_fill", "masked_fill_")):
        s, cond, value = node.args[0], arg(node, 1, "mask"), arg(node, 2, "value")
        fill = scalar_value(value)
        if fill is None or not is_tensor_node(cond) or fake(cond).dtype != torch.bool:
            return None
        return MaskOp(s, cond, False, fill)
    if is_call(node, torch.where):
        if len(node.args) != 3:
            return None
        cond, a, b = node.args
        if not is_tensor_node(cond) or fake(cond).dtype != torch.bool:
            return None
        fa, fb = scalar_value(a), scalar_value(b)
        if fb is not None and is_tensor_node(a):
            return MaskOp(a, cond, True, fb)
        if fa is not None and is_tensor_node(b):
            return MaskOp(b, cond, False, fa)
    return None


def is_tanh(node: fx.Node) -> bool:
    return is_call(node, torch.tanh, torch.Tensor.tanh, methods=("tanh",))


# ---------------------------------------------------------------- dropout
class Dropout(NamedTuple):
    input: fx.Node
    p: float
    active: bool


def dropout(node: fx.Node) -> Optional[Dropout]:
    if is_call(node, F.dropout):
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
        inplace = arg(node, 3, "inplace", False)
    elif is_call(node, torch.dropout):
        p, training, inplace = arg(node, 1, "p"), arg(node, 2, "train"), False
    elif is_call(node, methods=("dropout",)):
        p, training, inplace = arg(node, 1, "p", 0.5), arg(node, 2, "train", True), False
    else:
        return None
    if training is False and inplace is False:
        return Dropout(self_arg(node), 0.0, False)  # eval mode: p may be anything, even symbolic
    if not isinstance(p, (int, float)) or not isinstance(training, bool) or inplace not in (False, True):
        return None
    p = float(p)
    return Dropout(self_arg(node), p, bool(training) and p > 0)


def format_scale(value: float) -> str:
    """Scales print as 1/sqrt(d) when they are one (the common case), else as a number."""
    if value > 0:
        d = 1.0 / (value * value)
        if abs(d - round(d)) < 1e-6 and round(d) > 1:
            return f"1/sqrt({round(d)})"
    return f"{value:.6g}" if not math.isnan(value) else "nan"
