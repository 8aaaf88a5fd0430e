"""``TORCH_LOGS=+fusepass``: fusepass's loggers under torch's logging switch.

torch parses ``TORCH_LOGS`` when it is imported, before fusepass exists; fusepass registers its
logger with torch's registry (feature-tested; torch >= 2.1 has it) and, only when the variable
names fusepass, has torch apply it again.  ``+fusepass`` is DEBUG (every refusal and its
reason), ``fusepass`` INFO (every fused site), ``-fusepass`` ERROR, as for torch's own names.
"""

from __future__ import annotations

import logging
import os
import re

_ENV = "TORCH_LOGS"
_done = False


def requested_level(spec: str) -> int | None:
    """The level ``TORCH_LOGS``'s text ``spec`` asks of fusepass, None when it does not name it."""
    for item in re.split(r"[,\s]+", spec):
        if item.lstrip("+-") == "fusepass":
            return logging.DEBUG if item.startswith("+") else logging.ERROR if item.startswith("-") else logging.INFO
    return None


def configure() -> None:
    """Once per process: honour ``TORCH_LOGS`` for the ``fusepass`` loggers."""
    global _done
    if _done:
        return
    _done = True
    level = requested_level(os.environ.get(_ENV, ""))
    try:
        from torch._logging import _internal

        _internal.register_log("fusepass", "fusepass")
        if level is not None:
            _internal._init_logs()  # torch's handlers and format, now that it knows the name
            return
    except (ImportError, AttributeError, ValueError):  # a torch without that registry
        pass
    if level is not None:
        logger = logging.getLogger("fusepass")
        logger.setLevel(level)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
