"""The per-call host path: the op a site calls (no autograd layer where nothing needs grad),
the launcher that skips Triton's per-call argument binding (kernels/launcher.py), and the
decode rule's fast check agreeing with its explained form."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from torch._dynamo.utils import counters

from fusepass.kernels import decode, launcher


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v


def _emitted_ops(requires_grad: bool, grad_mode: bool) -> list:
    seen = []

    def inner(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function"
                    and str(n.target).startswith("fusepass."))
        return gm.forward

    from fusepass import backend

    def spy(gm, example_inputs):
        compiled = backend.fusepass_backend(gm, example_inputs, options={"inner": "eager"})
        inner(gm, example_inputs)
        return compiled

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=requires_grad) for _ in range(3))
    with torch.set_grad_enabled(grad_mode):
        out = torch.compile(attention, backend=spy)(q, k, v)
    torch.testing.assert_close(out, attention(q, k, v))
    return seen


def test_sites_that_need_no_grad_call_the_op_without_autograd():
    from fusepass.ops.attention import attention as trainable, attention_inference

    assert _emitted_ops(requires_grad=True, grad_mode=True) == [trainable]
    assert _emitted_ops(requires_grad=True, grad_mode=False) == [attention_inference]  # torch.no_grad()
    assert _emitted_ops(requires_grad=False, grad_mode=True) == [attention_inference]


def test_training_through_the_trainable_op_still_differentiates():
    torch._dynamo.reset()
    counters.clear()
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    compiled = torch.compile(attention, backend="fusepass", options={"inner": "aot_eager"})
    compiled(q, k, v).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v).sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)
    assert counters["fusepass"]["attention_fused"] == 1


# --- the launcher, against a stand-in for a Triton JITFunction -----------------------------


class _Compiled:
    def __init__(self, log):
        self.log = log
        self.function, self.packed_metadata = "cufunction", "metadata"

    def run(self, *args):
        self.log.append(("direct", args))


class _Jit:
    """What Launcher uses of a JITFunction: ``fn``, ``__name__`` and ``fn[grid](...)``, which
    returns the compiled kernel."""

    def __init__(self, compiled=True):
        def kernel(a, b, n, BLOCK, EXTRA=3):
            pass

        self.fn, self.__name__, self.log, self.compiled = kernel, "kernel", [], compiled

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log) if self.compiled else object()
        return run


class _Ptr:
    def __init__(self, address):
        self.address = address

    def data_ptr(self):
        return self.address


@pytest.fixture
def runtime(monkeypatch):
    hooks = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(launcher, "_runtime", lambda: (hooks, lambda: 0, lambda device: 77))
    launcher.direct_launches.clear()
    return hooks


def test_launcher_binds_once_then_calls_the_compiled_launcher(runtime):
    jit = _Jit()
    launch = launcher.Launcher(jit, {"BLOCK": 64}, num_warps=4, num_stages=2)
    a, b = _Ptr(4096), _Ptr(8192)
    launch((3, 2), a, b, 17)
    assert jit.log == [("jit", (3, 2), (a, b, 17), {"BLOCK": 64, "num_warps": 4, "num_stages": 2})]
    jit.log.clear()
    launch((3, 2), _Ptr(1024), b, 17)  # another buffer, same alignment: the compiled kernel
    assert len(jit.log) == 1 and jit.log[0][0] == "direct"
    # grid padded to 3-D, the current stream, the handles, no hooks, then every argument in
    # signature order: the positional ones and the constexpr / default tail.
    assert jit.log[0][1][:9] == (3, 2, 1, 77, "cufunction", "metadata", None, None, None)
    assert jit.log[0][1][9:] == (jit.log[0][1][9], b, 17, 64, 3)
    assert launcher.direct_launches["kernel"] == 1


def test_an_empty_hook_chain_counts_as_no_hook(runtime):
    # Triton >= 3.7 keeps its launch hooks in a HookChain, empty when nobody registered one.
    runtime.launch_enter_hook = types.SimpleNamespace(calls=[])
    runtime.launch_exit_hook = types.SimpleNamespace(calls=[])
    jit = _Jit()
    launch = launcher.Launcher(jit, {"BLOCK": 64}, num_warps=4, num_stages=2)
    for _ in range(2):
        launch((1,), _Ptr(4096), _Ptr(8192), 16)
    assert [entry[0] for entry in jit.log] == ["jit", "direct"]
    runtime.launch_enter_hook.calls.append(print)  # a registered hook: through JITFunction.run again
    launch((1,), _Ptr(4096), _Ptr(8192), 16)
    assert [entry[0] for entry in jit.log] == ["jit", "direct", "jit"]


def test_this_triton_s_hooks_are_recognized_as_unset():
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        pytest.skip("a Triton without knobs: the launcher always goes through JITFunction.run")
    assert launcher._unset(knobs.runtime.launch_enter_hook) and launcher._unset(knobs.runtime.launch_exit_hook)


@pytest.mark.parametrize("change", ["misaligned pointer", "int 1", "int off 16", "int64", "launch hook"])
def test_launcher_goes_through_triton_when_specialization_may_differ(runtime, change):
    jit = _Jit()
    launch = launcher.Launcher(jit, {"BLOCK": 64}, num_warps=4, num_stages=2)
    launch((1,), _Ptr(4096), _Ptr(8192), 16)
    jit.log.clear()
    args = [_Ptr(4096), _Ptr(8192), 16]
    if change == "misaligned pointer":
        args[0] = _Ptr(4098)  # a bf16 slice one element in: Triton specializes on 16-byte alignment
    elif change == "int 1":
        args[2] = 1  # ints equal to 1 become constants in Triton's specialization
    elif change == "int off 16":
        args[2] = 17  # ints divisible by 16 get the divisibility attribute
    elif change == "int64":
        args[2] = 2**31 + 16  # beyond int32: another argument type
    else:
        runtime.launch_enter_hook = lambda metadata: None  # a profiler's hook wants JITFunction.run
    launch((1,), *args)
    assert [entry[0] for entry in jit.log] == ["jit"]
    assert launcher.direct_launches["kernel"] == 0


def test_launcher_stays_direct_for_values_triton_does_not_specialize_on(runtime):
    # A decode step's cache length: a new int of the same class each step (and floats, which
    # Triton never specializes) must not cost a JITFunction.run, and must reach the kernel.
    jit = _Jit()
    launch = launcher.Launcher(jit, {"BLOCK": 64}, num_warps=4, num_stages=2)
    launch((1,), _Ptr(4096), 0.5, 4096)
    for n, x in ((4112, 0.25), (8192, 2.0), (2**31 - 16, -1.0)):
        launch((1,), _Ptr(4096), x, n)
        assert jit.log[-1][0] == "direct" and jit.log[-1][1][10:12] == (x, n)
    assert [entry[0] for entry in jit.log] == ["jit"] + ["direct"] * 3
    assert launcher.arg_key([4097]) != launcher.arg_key([4096]) != launcher.arg_key([1])


def test_a_fixed_tail_is_keyed_once_and_still_checked_when_it_changes(runtime):
    jit = _Jit()
    launch = launcher.Launcher(jit, {"BLOCK": 64}, num_warps=4, num_stages=2)
    tail = (16,)
    launch((1,), _Ptr(4096), _Ptr(8192), tail=tail)
    launch((1,), _Ptr(4096), _Ptr(8192), tail=tail)
    assert [entry[0] for entry in jit.log] == ["jit", "direct"]
    assert jit.log[-1][1][9:] == (jit.log[-1][1][9], jit.log[-1][1][10], 16, 64, 3)
    launch((1,), _Ptr(4096), _Ptr(8192), tail=(1,))  # another tail object, another class: Triton
    assert jit.log[-1][0] == "jit" and jit.log[-1][2][2] == 1


def test_two_launchers_given_one_tail_key_it_once(runtime, monkeypatch):
    """The decode step's two kernels take one tail, built anew per step of a growing cache."""
    keyed = []
    real = launcher.arg_key
    monkeypatch.setattr(launcher, "arg_key", lambda args: keyed.append(args) or real(args))
    split, combine = (launcher.Launcher(_Jit(), {"BLOCK": 64}, num_warps=4, num_stages=2) for _ in range(2))
    for n in (16, 17, 32):
        tail = (n,)
        split((1,), _Ptr(4096), _Ptr(8192), tail=tail)
        combine((1,), _Ptr(4096), _Ptr(8192), tail=tail)
        assert sum(k is tail for k in keyed) == 1
    assert launcher.arg_key((17,)) != launcher.arg_key((32,))


def test_launcher_without_the_compiled_interface_stays_on_triton(runtime):
    jit = _Jit(compiled=False)
    launch = launcher.Launcher(jit, {"BLOCK": 64}, num_warps=4, num_stages=2)
    for _ in range(3):
        launch((1,), _Ptr(4096), _Ptr(8192), 16)
    assert [entry[0] for entry in jit.log] == ["jit"] * 3


def test_launcher_trailing_values_follow_the_kernel_signature():
    jit = _Jit()
    assert launcher._trailing_values(jit, 3, {"BLOCK": 32}) == (32, 3)
    assert launcher._trailing_values(jit, 3, {"BLOCK": 32, "EXTRA": 5}) == (32, 5)
    assert launcher._trailing_values(jit, 3, {}) is None  # BLOCK has no value
    assert launcher._trailing_values(jit, 3, {"BLOCK": 1, "NOPE": 2}) is None
    assert list(inspect.signature(jit.fn).parameters)[:3] == ["a", "b", "n"]


def test_decode_fast_check_agrees_with_the_explained_rule():
    from fusepass.ops.dispatch import forward_call

    for M, Hq, Hkv, N in [(1, 8, 2, 5000), (1, 8, 2, 100), (17, 4, 4, 8192), (16, 8, 1, 8192), (4, 8, 8, 4096)]:
        q = torch.randn(1, Hq, M, 8)
        k = torch.randn(1, Hkv, N, 8)
        call = forward_call(q, k, k, [], [], None, 0.3, 0.0, 0.0, float("-inf"), "", [], "")
        decode._last_step.clear()
        serves = decode.serves(call)
        decode._last_step.clear()
        assert serves == (decode.refusal(call) is None), (M, Hq, Hkv, N)


# --- runners: a call's launch bound to its signature (ops/dispatch.py) ----------------------


def _op_args(q, k, v, seed=None, run=""):
    return (q, k, v, [], [], seed, 0.125, 0.0, 0.0, float("-inf"), "", [], run)


def test_runner_key_tells_apart_everything_validation_and_the_path_read():
    from fusepass.ops.dispatch import runner_key

    q = torch.randn(1, 2, 8, 16)
    base = runner_key(*_op_args(q, q, q))
    assert runner_key(*_op_args(q.clone(), q.clone(), q.clone())) == base  # same signature, other tensors
    others = [
        _op_args(q.transpose(2, 3).contiguous().transpose(2, 3), q, q),  # strides
        _op_args(q, q.double(), q),  # a dtype the validation refuses
        _op_args(q, q, q[:, :, :4]),  # shapes
        _op_args(q, q, q, seed=torch.tensor(3)),
        _op_args(q, q, q, seed=torch.tensor(3.0)),  # a float seed the validation refuses
        _op_args(q, q, q, run="autotune=0"),
    ]
    keys = [runner_key(*a) for a in others]
    assert base not in keys and len(set(keys)) == len(keys)


def test_a_runner_is_bound_on_a_signature_s_second_call_and_then_serves_it(monkeypatch):
    # CPU tensors never take runners (the interpreter plans per call); here the binding logic
    # runs with the CUDA check and the runner factory stood in for.
    from fusepass.ops import dispatch

    class Cuda(torch.Tensor):
        is_cuda = True

    bound, served = [], []

    def runner_for(call):
        bound.append(call)

        def run(q, k, v, biases, masks, seed):
            served.append(q)
            return dispatch.run_forward(dispatch.forward_call(q, k, v, biases, masks, seed, 0.125, 0.0, 0.0,
                                                              float("-inf"), "", []))
        return run

    monkeypatch.setattr(dispatch, "_runner_for", runner_for)
    monkeypatch.setattr(dispatch, "_runners", {})
    monkeypatch.setattr(decode, "capturing", lambda q: False)  # no CUDA to ask
    q = torch.randn(1, 2, 8, 16).as_subclass(Cuda)
    for _ in range(4):
        dispatch.forward(*_op_args(q, q, q))
    assert len(bound) == 1 and len(served) == 2  # call 1 marks, call 2 binds, calls 3 and 4 are served
    k = torch.randn(1, 2, 9, 16).as_subclass(Cuda)  # a growing cache: a new key per step binds nothing
    dispatch.forward(*_op_args(q, k, k))
    assert len(bound) == 1
    monkeypatch.setattr(dispatch, "_runner_for", lambda call: None)  # no runner possible: asked once
    r = torch.randn(1, 2, 5, 16).as_subclass(Cuda)
    for _ in range(3):
        dispatch.forward(*_op_args(r, r, r))
    assert dispatch._runners[dispatch.runner_key(*_op_args(r, r, r))] is dispatch._UNBOUND
