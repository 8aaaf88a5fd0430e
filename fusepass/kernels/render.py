"""Render the kernel templates, cache the sources, and import them as Python modules.

``triton.jit`` reads a kernel's source with ``inspect``, so every rendered kernel is written to
a real ``.py`` file and imported from there.  Sources are cached twice: in memory (module per
key) and on disk under ``kernels/`` in the one cache root (``fusepass.cache_dir``),
keyed by a hash of every template's text plus the render parameters.

Triton decides between compiling and interpreting when ``@triton.jit`` runs, by reading
``TRITON_INTERPRET`` (triton 3.x); modules are therefore imported with that variable set to
the mode wanted and cached per mode.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import importlib.util
import json
import logging
import os
import pathlib
import sys
import tempfile
import threading
from types import ModuleType
from typing import Any, Mapping

import jinja2

from fusepass.cache_dir import cache_root

log = logging.getLogger(__name__)

_REPO_TEMPLATES = pathlib.Path(__file__).resolve().parents[2] / "templates"
_lock = threading.Lock()
_modules: dict[tuple[str, bool], ModuleType] = {}
_sources: dict[str, str] = {}


def _template_dir():
    """The installed package data (fusepass.templates), else the checkout's templates/ folder."""
    try:
        root = importlib.resources.files("fusepass.templates")
        if root.joinpath("attention_fwd.py.jinja").is_file():
            return root
    except (ModuleNotFoundError, TypeError):
        pass
    return _REPO_TEMPLATES


def _read_template(name: str) -> str:
    return _template_dir().joinpath(name).read_text()


@functools.lru_cache(maxsize=1)
def _all_templates_text() -> str:
    # Read once per process: hashing the files on every launch cost ~100 us of host time.
    d = _template_dir()
    names = sorted(p.name for p in d.iterdir() if p.name.endswith(".jinja"))
    return "".join(n + "\0" + d.joinpath(n).read_text() for n in names)


_env = jinja2.Environment(
    loader=jinja2.FunctionLoader(lambda name: _read_template(name)),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def cache_dir() -> pathlib.Path:
    return cache_root() / "kernels"


@functools.lru_cache(maxsize=1)
def template_hash() -> str:
    """The one hash of every template's text: names generated kernels (``key_of``) and marks
    tuned configs stale (the autotune key) whenever a template changes."""
    return hashlib.sha256(_all_templates_text().encode()).hexdigest()[:16]


def key_of(template: str, params: Mapping[str, Any]) -> str:
    blob = json.dumps({"template": template, "params": dict(params)}, sort_keys=True, default=str)
    return hashlib.sha256((template_hash() + "\0" + blob).encode()).hexdigest()[:24]


def render(template: str, params: Mapping[str, Any]) -> str:
    """The generated source of ``template`` (e.g. "attention_fwd.py.jinja") for ``params``."""
    key = key_of(template, params)
    src = _sources.get(key)
    if src is None:
        src = _env.get_template(template).render(**params)
        _sources[key] = src
    return src


@contextlib.contextmanager
def _interpret_env(interpret: bool):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_interp_fns: dict = {}
_patch_lock = threading.RLock()


@contextlib.contextmanager
def interpreting():
    """Run launches of interpreted kernels inside this.

    Triton's standard library (tl.zeros, tl.sum, tl.max, ...) is decorated with @triton.jit
    when triton is first imported; unless TRITON_INTERPRET=1 was set then, those are compiled
    JITFunctions, which refuse to run inside an interpreted kernel.  For the duration of the
    launch, such calls are routed through the interpreter's own device-call path.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        # Keyed by id: hashing a JITFunction walks its dependencies, which are patched now.
        fn = _interp_fns.get(id(self))
        if fn is None:
            fn = _interp_fns[id(self)] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    with _patch_lock:
        old = JITFunction.__call__
        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = old


def load(template: str, params: Mapping[str, Any], *, interpret: bool = False) -> ModuleType:
    """Render, write (once) and import the kernel module for ``params``; cached per process."""
    key = key_of(template, params)
    mod = _modules.get((key, interpret))
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get((key, interpret))
        if mod is not None:
            return mod
        src = render(template, params)
        path = cache_dir() / f"{template.split('.')[0]}_{key}.py"
        if not path.exists() or path.read_text() != src:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic write: several processes (ranks) may render the same kernel at once.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(src)
            os.replace(tmp, path)
            log.debug("rendered %s -> %s", template, path)
        name = f"fusepass_kernel_{key}_{'i' if interpret else 'c'}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        with _interpret_env(interpret):
            spec.loader.exec_module(mod)
        _modules[(key, interpret)] = mod
        return mod


def show(direction: str = "fwd", **features: Any) -> str:
    """The generated kernel source for a feature set, for debugging.

    ``direction`` is "fwd" or "bwd"; ``features`` are those of
    ``fusepass.kernels.spec.KernelSpec`` (e.g. ``show("fwd", pred="j <= i", softcap=True)``).
    """
    from .spec import KernelSpec

    spec = KernelSpec.from_features(**features)
    template = "attention_fwd.py.jinja" if direction == "fwd" else "attention_bwd.py.jinja"
    return render(template, spec.render_params())
