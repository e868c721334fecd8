"""Distributed execution over Celery workers and Redis: `Context(executor=CeleryExecutor(app))`.

The names below load on first use: `import tasktree_dist` wires this package's runs interface without paying for
Celery, which only a process that coordinates or serves units needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_NAMES = {
    "BlackboardConflictError": ".changes",
    "CeleryExecutor": ".executor",
    "DispatchError": ".executor",
    "create_app": ".app",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module, __name__), name)
