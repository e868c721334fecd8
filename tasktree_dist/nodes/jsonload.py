"""Reading JSON the way ParseJSON does: a surrounding code fence removed, then the loader.

The default loader tries strict JSON first (orjson: fast, exact) and falls back to json-repair for the non-strict
JSON LLMs write. `json_repair` is looked up on this module at each call, and `tasktree_dist.json_repair` is the
same name (see the package's `__init__`), so tinytasktree's tests and users can swap or disable it (None).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

try:
    import json_repair
except ImportError:  # pragma: no cover - json-repair is a declared dependency
    json_repair = None
try:
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

#: A loader takes the fence-free text and returns the JSON value, or None (or raises ValueError) when it cannot.
JSONLoader = Callable[[str], Any]

# ``` then a language tag: `json` even when the object follows at once, any other tag only before white space
_OPENING_FENCE = re.compile(r"^```(?:json\b|[A-Za-z0-9_+-]*(?=\s))?", re.IGNORECASE)


def strip_fences(text: str) -> str:
    """The text without the ```json ... ``` fence LLMs like to add (either end may be missing: a cut answer)."""
    text = text.strip()
    if text.startswith("```"):
        text = _OPENING_FENCE.sub("", text, count=1)
    if text.endswith("```"):
        text = text[:-3]
    return text.strip()


def load_json(text: str) -> Any:
    """The default loader: strict JSON first, then json-repair (when installed and not disabled)."""
    try:
        return _orjson.loads(text) if _orjson is not None else json.loads(text)
    except ValueError:
        if json_repair is None:
            raise
    repaired = json_repair.loads(text)
    if repaired == "" and text not in ("", '""'):
        raise ValueError(f"not JSON and not repairable: {text[:80]!r}")
    return repaired
