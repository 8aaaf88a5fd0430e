"""The one cache root: tuned configs (``autotune/cache.py``) and generated kernels
(``kernels/render.py``) live under it.  Plain paths, no torch: the CLI reads it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """``$FUSEPASS_CACHE_DIR``, else the user's cache directory + ``fusepass``
    (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux; the platform's own place elsewhere)."""
    env = os.environ.get("FUSEPASS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "fusepass" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "fusepass"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fusepass"
