"""How values are shown to people (trace attributes, result payloads): JSON for structured data, str() for the rest.

Kept apart from the trace model so Result can render itself without importing traces.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson


def json_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def display_string(data: Any) -> str:
    """How a payload or attribute is shown in a trace: JSON for structured data, str() for the rest."""
    if isinstance(data, str):
        return data
    if isinstance(data, dict | list) or dataclasses.is_dataclass(data) or hasattr(data, "model_dump"):
        try:
            return orjson.dumps(data, default=json_default, option=orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, ValueError):
            return str(data)
    return str(data)
