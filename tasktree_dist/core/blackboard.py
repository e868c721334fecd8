"""Reading and writing blackboard fields the same way for objects (dataclasses, pydantic) and dicts."""

from __future__ import annotations

from typing import Any

#: Any blackboard type: a dataclass, a pydantic model or a dict (tinytasktree's name, for annotations).
AnyB = Any

_MISSING = object()


def read_field(blackboard: Any, name: str) -> Any:
    if isinstance(blackboard, dict):
        if name in blackboard:
            return blackboard[name]
        raise KeyError(f"blackboard has no key {name!r}")
    value = getattr(blackboard, name, _MISSING)
    if value is _MISSING:
        raise AttributeError(f"blackboard {type(blackboard).__name__} has no attribute {name!r}")
    return value


def write_field(blackboard: Any, name: str, value: Any) -> None:
    if isinstance(blackboard, dict):
        blackboard[name] = value
    else:
        setattr(blackboard, name, value)
