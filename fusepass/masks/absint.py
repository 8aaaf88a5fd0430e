"""Abstract interpretation of a mask's producer subgraph.

Every FX node gets a *value*: a sympy expression over the index symbols ``X[0], X[1], ...`` of
that node's own axes (``X[k]`` is the index along axis k).  Integer tensors are sympy integers
(possibly ``Piecewise``), bool tensors are sympy booleans, floats are sympy numbers (``-oo`` for
-inf).  Invariant: a value never depends on an axis whose size is 1 (that symbol is replaced
by 0), so broadcasting is a shift of axis symbols and nothing else.

What cannot be read becomes an *atom*: an undefined function of the node's axes,
``D_<node>(X..)`` (``Eq(D, 1)`` when the node is bool).  Atoms stand for the node's runtime
tensor; the reader later asks whether they combine with the position part by a plain ``&``.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx

log = logging.getLogger(__name__)

X = tuple(sympy.Symbol(f"_x{k}", integer=True, nonnegative=True) for k in range(12))


class Unreadable(Exception):
    """A construct the interpreter does not understand (the message says which)."""


def size_expr(s: Any) -> sympy.Expr:
    if isinstance(s, torch.SymInt):
        return sympy.sympify(s.node.expr)
    return sympy.Integer(int(s))


def is_bool(v: Any) -> bool:
    return isinstance(v, (sympy.logic.boolalg.Boolean, bool)) and not isinstance(v, sympy.Expr)


def as_num(v: Any) -> sympy.Expr:
    if v is True or v is sympy.true:
        return sympy.Integer(1)
    if v is False or v is sympy.false:
        return sympy.Integer(0)
    if is_bool(v):
        return sympy.Piecewise((sympy.Integer(1), v), (sympy.Integer(0), True))
    return sympy.sympify(v)


def pw_to_bool(v: Any) -> Any:
    """A Piecewise whose branch values are booleans, as a boolean formula."""
    if not isinstance(v, sympy.Piecewise):
        return v
    out, prev = sympy.false, sympy.true
    for val, cond in v.args:
        val = pw_to_bool(val)
        out = sympy.Or(out, sympy.And(prev, cond, val))
        prev = sympy.And(prev, sympy.Not(cond))
    return out


def as_bool(v: Any) -> Any:
    if is_bool(v):
        return sympy.sympify(v)
    return pw_to_bool(sympy.piecewise_fold(sympy.Ne(v, 0)))


def fold(v: Any) -> Any:
    v = sympy.piecewise_fold(v)
    if isinstance(v, sympy.Piecewise) and all(b[0] == v.args[0][0] for b in v.args):
        return v.args[0][0]
    return v


def relate(op: Callable, a: Any, b: Any) -> Any:
    a, b = as_num(a), as_num(b)
    return pw_to_bool(sympy.piecewise_fold(op(a, b)))


def ite(c: Any, a: Any, b: Any) -> Any:
    """where(c, a, b) as a value."""
    c = as_bool(c)
    if c is sympy.true:
        return a
    if c is sympy.false:
        return b
    if is_bool(a) and is_bool(b):
        return sympy.Or(sympy.And(c, a), sympy.And(sympy.Not(c), b))
    return fold(sympy.Piecewise((as_num(a), c), (as_num(b), True)))


_ARITH = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}
_REL = {"lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge, "eq": sympy.Eq, "ne": sympy.Ne}
_LOGIC = {"and": sympy.And, "or": sympy.Or, "xor": sympy.Xor}
_OPERATOR_NAMES = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.floordiv: "floordiv",
    operator.mod: "mod", operator.truediv: "truediv", operator.lt: "lt", operator.le: "le",
    operator.gt: "gt", operator.ge: "ge", operator.eq: "eq", operator.ne: "ne", operator.and_: "and",
    operator.or_: "or", operator.xor: "xor", operator.invert: "not", operator.neg: "neg",
    operator.abs: "abs", operator.getitem: "getitem",
}
_TORCH_ALIASES = {
    "logical_and": "and", "bitwise_and": "and", "__and__": "and", "logical_or": "or", "bitwise_or": "or",
    "__or__": "or", "logical_xor": "xor", "bitwise_xor": "xor", "logical_not": "not", "bitwise_not": "not",
    "__invert__": "not", "floor_divide": "floordiv", "remainder": "mod", "fmod": "fmod", "div": "div",
    "multiply": "mul", "subtract": "sub", "greater": "gt", "less": "lt", "greater_equal": "ge",
    "less_equal": "le", "not_equal": "ne", "__getitem__": "getitem", "__eq__": "eq", "__ne__": "ne",
}
_CASTS = {"to", "type", "float", "double", "half", "bfloat16", "bool", "int", "long", "short", "byte",
          "char", "type_as", "contiguous", "clone", "detach", "_to_copy", "requires_grad_"}


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        t = node.target
        if t in _OPERATOR_NAMES:
            return _OPERATOR_NAMES[t]
        name = getattr(t, "__name__", str(t))
    else:
        return node.op
    return _TORCH_ALIASES.get(name, name)


def meta_value(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def node_shape(node: fx.Node) -> tuple[sympy.Expr, ...]:
    v = meta_value(node)
    if not isinstance(v, torch.Tensor):
        raise Unreadable(f"{node.name}: no tensor metadata")
    return tuple(size_expr(s) for s in v.shape)


def node_dtype(node: Any) -> Optional[torch.dtype]:
    v = meta_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def normalize(shape: tuple, expr: Any) -> Any:
    """Drop dependence on size-1 axes (their index is 0)."""
    sub = {X[k]: sympy.Integer(0) for k, s in enumerate(shape) if s == 1}
    return expr.xreplace(sub) if sub and isinstance(expr, sympy.Basic) else expr


def shift(expr: Any, r: int, R: int) -> Any:
    """A value over a rank-r operand, seen right-aligned inside a rank-R result."""
    if R == r or not isinstance(expr, sympy.Basic):
        return expr
    return expr.xreplace({X[k]: X[k + R - r] for k in range(r)})


@dataclass
class Interpreter:
    """Values of the nodes of one graph, computed on demand and memoized.

    ``constant_tensor(node)`` returns the real tensor of a placeholder/get_attr that may be read
    by value (a buffer), or None; ``recognize(tensor)`` turns such a tensor into
    ``(value over its axes, pattern)`` or None.
    """

    constant_tensor: Callable[[fx.Node], Optional[torch.Tensor]]
    recognize: Callable[[torch.Tensor, fx.Node], Optional[Any]]
    values: dict = field(default_factory=dict)
    atoms: dict = field(default_factory=dict)          # sympy Function -> fx.Node
    size_symbols: dict = field(default_factory=dict)   # sympy Symbol -> fx.Node
    buffers: dict = field(default_factory=dict)        # fx.Node -> pattern (for guards)

    # -- scalars -------------------------------------------------------------------------
    def scalar(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            v = meta_value(a)
            if isinstance(v, torch.Tensor):
                if v.dim() != 0:
                    raise Unreadable(f"{a.name}: a tensor where a scalar was expected")
                return self.value(a)
            if isinstance(v, (int, bool)) and not isinstance(v, torch.SymInt):
                return sympy.Integer(int(v))
            if isinstance(v, torch.SymInt):
                sym = sympy.Symbol(f"_n_{a.name}", integer=True)
                self.size_symbols[sym] = a
                return sym
            raise Unreadable(f"{a.name}: scalar of type {type(v).__name__}")
        if isinstance(a, bool):
            return sympy.true if a else sympy.false
        if isinstance(a, int):
            return sympy.Integer(a)
        if isinstance(a, float):
            if math.isinf(a):
                return -sympy.oo if a < 0 else sympy.oo
            if a == int(a) and abs(a) < 2**53:
                return sympy.Integer(int(a))
            return sympy.Float(a)
        if isinstance(a, torch.SymInt):
            raise Unreadable("a SymInt constant that is not a graph node")
        raise Unreadable(f"scalar of type {type(a).__name__}")

    def operand(self, a: Any, R: int) -> Any:
        """An elementwise operand's value over the result's axes (rank R)."""
        if isinstance(a, fx.Node) and isinstance(meta_value(a), torch.Tensor):
            return shift(self.value(a), meta_value(a).dim(), R)
        return self.scalar(a)

    # -- nodes ---------------------------------------------------------------------------
    def value(self, node: fx.Node) -> Any:
        if node in self.values:
            return self.values[node]
        shape = node_shape(node)
        try:
            v = self._compute(node, shape)
        except Unreadable as e:
            log.debug("mask reader: %s becomes an opaque tensor term (%s)", node.name, e)
            v = self._atom(node, shape)
        v = normalize(shape, v)
        self.values[node] = v
        return v

    def _atom(self, node: fx.Node, shape: tuple) -> Any:
        f = sympy.Function(f"D_{node.name}")
        self.atoms[f] = node
        term = f(*X[: len(shape)]) if shape else f(sympy.Integer(0))
        return sympy.Eq(term, 1) if node_dtype(node) == torch.bool else term

    def _compute(self, node: fx.Node, shape: tuple) -> Any:
        R = len(shape)
        name = op_name(node)
        args, kwargs = node.args, node.kwargs
        if node.op in ("placeholder", "get_attr"):
            t = self.constant_tensor(node)
            if t is None:
                raise Unreadable("a data input")
            got = self.recognize(t, node)
            if got is None:
                raise Unreadable("a buffer whose values are not a recognized 0/1 pattern")
            value, pattern = got
            self.buffers[node] = pattern
            return value
        if node.op not in ("call_function", "call_method"):
            raise Unreadable(f"node kind {node.op}")
        handler = getattr(self, f"_op_{name}", None)
        if handler is None and name in _CASTS:
            handler = self._op_cast
        if handler is None:
            raise Unreadable(f"operation {name!r}")
        return handler(node, shape, R, args, kwargs)

    # -- elementwise ---------------------------------------------------------------------
    def _binary(self, node, R, args):
        if len(args) != 2:
            raise Unreadable(f"{op_name(node)} with {len(args)} arguments")
        return self.operand(args[0], R), self.operand(args[1], R)

    def _arith(self, node, shape, R, args, kwargs):
        if kwargs.get("alpha", 1) != 1:
            raise Unreadable("alpha= in add/sub")
        a, b = self._binary(node, R, args)
        if is_bool(a) and is_bool(b) and op_name(node) == "add":
            return sympy.Or(a, b)
        return fold(_ARITH[op_name(node)](as_num(a), as_num(b)))

    _op_add = _op_sub = _op_mul = _arith

    def _op_rsub(self, node, shape, R, args, kwargs):
        a, b = self._binary(node, R, args)
        return fold(as_num(b) - as_num(a))

    def _op_floordiv(self, node, shape, R, args, kwargs):
        a, b = self._binary(node, R, args)
        return fold(sympy.floor(as_num(a) / as_num(b)))

    def _op_div(self, node, shape, R, args, kwargs):
        if kwargs.get("rounding_mode") != "floor" or node_dtype(node) in (torch.float32, torch.float64):
            raise Unreadable("true division")
        return self._op_floordiv(node, shape, R, args, kwargs)

    def _op_mod(self, node, shape, R, args, kwargs):
        a, b = self._binary(node, R, args)
        return fold(sympy.Mod(as_num(a), as_num(b)))

    def _rel(self, node, shape, R, args, kwargs):
        a, b = self._binary(node, R, args)
        if is_bool(a) and is_bool(b) and op_name(node) in ("eq", "ne"):
            eq = sympy.Equivalent(a, b)
            return eq if op_name(node) == "eq" else sympy.Not(eq)
        return relate(_REL[op_name(node)], a, b)

    _op_lt = _op_le = _op_gt = _op_ge = _op_eq = _op_ne = _rel

    def _logic(self, node, shape, R, args, kwargs):
        a, b = self._binary(node, R, args)
        if not (is_bool(a) and is_bool(b)):
            raise Unreadable(f"bitwise {op_name(node)} on integers")
        return _LOGIC[op_name(node)](a, b)

    _op_and = _op_or = _op_xor = _logic

    def _op_not(self, node, shape, R, args, kwargs):
        a = self.operand(args[0], R)
        if not is_bool(a):
            raise Unreadable("bitwise not on integers")
        return sympy.Not(a)

    def _op_neg(self, node, shape, R, args, kwargs):
        return fold(-as_num(self.operand(args[0], R)))

    def _op_abs(self, node, shape, R, args, kwargs):
        return fold(sympy.Abs(as_num(self.operand(args[0], R))))

    def _op_minimum(self, node, shape, R, args, kwargs):
        a, b = self._binary(node, R, args)
        return fold(sympy.Min(as_num(a), as_num(b)))

    def _op_maximum(self, node, shape, R, args, kwargs):
        a, b = self._binary(node, R, args)
        return fold(sympy.Max(as_num(a), as_num(b)))

    def _op_where(self, node, shape, R, args, kwargs):
        if len(args) != 3:
            raise Unreadable("where with one argument")
        c, a, b = (self.operand(x, R) for x in args)
        return ite(c, a, b)

    def _op_masked_fill(self, node, shape, R, args, kwargs):
        x, m = self.operand(args[0], R), self.operand(args[1], R)
        fill = self.operand(args[2] if len(args) > 2 else kwargs["value"], R)
        if node_dtype(node) == torch.bool:
            fill = as_bool(fill)
        return ite(m, fill, x)

    def _op_cast(self, node, shape, R, args, kwargs):
        src = args[0]
        v = self.operand(src, R)
        dst = node_dtype(node)
        if dst == torch.bool:
            return as_bool(v)
        if dst is not None and not dst.is_floating_point and node_dtype(src) is not None \
                and node_dtype(src).is_floating_point:
            raise Unreadable("float to integer cast")
        return v if is_bool(v) is False or dst is None else as_num(v)

    # -- constructors --------------------------------------------------------------------
    def _op_arange(self, node, shape, R, args, kwargs):
        a = [self.scalar(x) for x in args]
        start = a[0] if len(a) >= 2 else self.scalar(kwargs.get("start", 0))
        step = a[2] if len(a) >= 3 else self.scalar(kwargs.get("step", 1))
        if node_dtype(node) is not None and node_dtype(node).is_floating_point:
            raise Unreadable("floating arange")
        return start + step * X[0]

    def _const(self, node, value):
        v = self.scalar(value)
        return as_bool(v) if node_dtype(node) == torch.bool else as_num(v)

    def _op_ones(self, node, shape, R, args, kwargs):
        return self._const(node, 1)

    _op_ones_like = _op_new_ones = _op_ones

    def _op_zeros(self, node, shape, R, args, kwargs):
        return self._const(node, 0)

    _op_zeros_like = _op_new_zeros = _op_zeros

    def _op_full(self, node, shape, R, args, kwargs):
        return self._const(node, args[1] if len(args) > 1 else kwargs["fill_value"])

    _op_full_like = _op_full

    def _op_new_full(self, node, shape, R, args, kwargs):
        return self._const(node, args[2] if len(args) > 2 else kwargs["fill_value"])

    def _op_scalar_tensor(self, node, shape, R, args, kwargs):
        return self._const(node, args[0])

    def _op_tensor(self, node, shape, R, args, kwargs):
        if R != 0 or isinstance(args[0], (list, tuple)):
            raise Unreadable("torch.tensor of a list")
        return self._const(node, args[0])

    def _tri(self, node, shape, R, args, kwargs, lower):
        if R < 2:
            raise Unreadable("tril/triu below rank 2")
        v = self.operand(args[0], R)
        d = self.scalar(args[1] if len(args) > 1 else kwargs.get("diagonal", 0))
        cond = (X[R - 1] - X[R - 2] <= d) if lower else (X[R - 1] - X[R - 2] >= d)
        zero = sympy.false if is_bool(v) else sympy.Integer(0)
        return ite(cond, v, zero)

    def _op_tril(self, node, shape, R, args, kwargs):
        return self._tri(node, shape, R, args, kwargs, True)

    def _op_triu(self, node, shape, R, args, kwargs):
        return self._tri(node, shape, R, args, kwargs, False)

    # -- scans ---------------------------------------------------------------------------
    def _op_diff(self, node, shape, R, args, kwargs):
        if len(args) > 1 or kwargs.get("n", 1) != 1 or kwargs.get("append") is not None:
            raise Unreadable("diff with n/append")
        d = kwargs.get("dim", -1) % R
        v = self.operand(args[0], R)
        prev = v.xreplace({X[d]: X[d] - 1})
        pre = kwargs.get("prepend")
        if pre is None:
            return fold(v.xreplace({X[d]: X[d] + 1}) - v)
        if meta_value(pre).shape[d] != 1:
            raise Unreadable("diff with a prepend longer than 1")
        p = self.operand(pre, R)
        return fold(sympy.Piecewise((v - prev, X[d] >= 1), (v.xreplace({X[d]: sympy.Integer(0)}) - p, True)))

    def _op_cumsum(self, node, shape, R, args, kwargs):
        d = (args[1] if len(args) > 1 else kwargs["dim"]) % R
        v = as_num(self.operand(args[0], R))
        if v.has(X[d]):
            raise Unreadable("cumsum of a value that varies along the axis")
        return fold(v * (X[d] + 1))

    # -- views ---------------------------------------------------------------------------
    def _remap(self, src: fx.Node, mapping: dict[int, Any]) -> Any:
        """The source's value with its axis k read at ``mapping[k]`` (an expression)."""
        v = self.value(src)
        if not isinstance(v, sympy.Basic):
            return v
        return v.xreplace({X[k]: e for k, e in mapping.items()})

    def _op_unsqueeze(self, node, shape, R, args, kwargs):
        d = (args[1] if len(args) > 1 else kwargs["dim"]) % R
        return self._remap(args[0], {k: X[k if k < d else k + 1] for k in range(R - 1)})

    def _op_squeeze(self, node, shape, R, args, kwargs):
        src_shape = node_shape(args[0])
        keep = [k for k, s in enumerate(src_shape) if not (s == 1 and (
            len(args) < 2 or k in {a % len(src_shape) for a in (args[1] if isinstance(args[1], (tuple, list)) else [args[1]])}))]
        if len(keep) != R:
            raise Unreadable("squeeze")
        return self._remap(args[0], {k: X[keep.index(k)] if k in keep else sympy.Integer(0)
                                     for k in range(len(src_shape))})

    def _op_expand(self, node, shape, R, args, kwargs):
        return shift(self.value(args[0]), meta_value(args[0]).dim(), R)

    _op_expand_as = _op_broadcast_to = _op_expand

    def _op_view(self, node, shape, R, args, kwargs):
        if len(args) > 1 and isinstance(args[1], torch.dtype):
            raise Unreadable("view as another dtype")
        src_shape = node_shape(args[0])
        a = [k for k, s in enumerate(src_shape) if s != 1]
        b = [k for k, s in enumerate(shape) if s != 1]
        if [src_shape[k] for k in a] != [shape[k] for k in b]:
            raise Unreadable("a reshape that splits or merges axes")
        mapping = {k: sympy.Integer(0) for k in range(len(src_shape))}
        mapping.update({ka: X[kb] for ka, kb in zip(a, b)})
        return self._remap(args[0], mapping)

    _op_reshape = _op_view

    def _op_permute(self, node, shape, R, args, kwargs):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        dims = [d % R for d in dims]
        return self._remap(args[0], {src: X[out] for out, src in enumerate(dims)})

    def _op_transpose(self, node, shape, R, args, kwargs):
        d0, d1 = args[1] % R, args[2] % R
        m = {k: X[k] for k in range(R)}
        m[d0], m[d1] = X[d1], X[d0]
        return self._remap(args[0], m)

    def _op_getitem(self, node, shape, R, args, kwargs):
        src, idx = args
        if not isinstance(meta_value(src), torch.Tensor):
            raise Unreadable("getitem of a non-tensor")
        src_shape = node_shape(src)
        idx = list(idx) if isinstance(idx, (tuple, list)) else [idx]
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if Ellipsis in idx:
            e = idx.index(Ellipsis)
            idx[e : e + 1] = [slice(None)] * (len(src_shape) - used)
        idx += [slice(None)] * (len(src_shape) - used - sum(1 for i in idx if i is Ellipsis))
        tensor_pos = [p for p, i in enumerate(idx) if isinstance(i, fx.Node)
                      and isinstance(meta_value(i), torch.Tensor)]
        adv_shape: tuple = ()
        if tensor_pos:
            if tensor_pos != list(range(tensor_pos[0], tensor_pos[-1] + 1)):
                raise Unreadable("non-adjacent advanced indices")
            adv_shape = tuple(torch.broadcast_shapes(*(meta_value(idx[p]).shape for p in tensor_pos)))
        mapping, out_axis, src_axis, adv_done = {}, 0, 0, False
        for p, i in enumerate(idx):
            if i is None:
                out_axis += 1
            elif p in tensor_pos:
                if not adv_done:
                    adv_start, adv_done = out_axis, True
                    out_axis += len(adv_shape)
                iv = shift(self.value(i), meta_value(i).dim(), len(adv_shape))
                iv = iv.xreplace({X[k]: X[k + adv_start] for k in range(len(adv_shape))})
                mapping[src_axis] = iv
                src_axis += 1
            elif isinstance(i, slice):
                start = self.scalar(i.start) if i.start is not None else sympy.Integer(0)
                step = self.scalar(i.step) if i.step is not None else sympy.Integer(1)
                if (start.is_number and start < 0) or not (step.is_number and step > 0):
                    raise Unreadable("slice with a negative start or step")
                mapping[src_axis] = start + step * X[out_axis]
                src_axis += 1
                out_axis += 1
            else:
                k = self.scalar(i)
                if k.is_number and k < 0:
                    k = src_shape[src_axis] + k
                mapping[src_axis] = k
                src_axis += 1
        if out_axis != R:
            raise Unreadable("getitem whose result rank does not add up")
        return self._remap(src, mapping)
