"""What this process can run from a spec, as published with its heartbeat: the registered functions, tools, stores
and types, and the trees with their blackboard's JSON Schema (so a submitter without the user's modules validates a
blackboard before anything is queued)."""

from __future__ import annotations

from typing import Any

from ..core.registry import registered_trees
from ..core.serde import registered_types
from .spec_names import palette

#: Trees the fleet builds from stored specs are named `<name>@<spec hash>`: internal, not offered to specs.
SPEC_TREE_MARK = "@"


def blackboard_schema(tree: Any) -> dict[str, Any] | None:
    """The tree's blackboard JSON Schema: the spec's, or its blackboard type's (pydantic), computed once per tree."""
    cached = getattr(tree, "_blackboard_json_schema", None)
    if cached is not None:
        return cached or None
    schema = getattr(tree, "blackboard_schema", None)
    kind = getattr(tree, "blackboard_type", None)
    if schema is None and kind is not None:
        schema = type_schema(kind)
    try:
        tree._blackboard_json_schema = schema or {}
    except AttributeError:
        pass
    return schema


def type_schema(kind: type) -> dict[str, Any] | None:
    from pydantic import TypeAdapter

    try:
        schema = TypeAdapter(kind).json_schema()
    except Exception:  # noqa: BLE001 - a type pydantic cannot describe: no validation at submit
        return None
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False  # a field the type does not have would be dropped silently
    return schema


_cache: tuple[Any, dict[str, Any]] | None = None


def process_palette() -> dict[str, Any]:
    """This process's palette; recomputed only when something was registered (it goes out with every beat)."""
    global _cache
    from . import spec_names

    version = (tuple((n, t.fingerprint) for n, t in sorted(registered_trees().items())), tuple(registered_types()),
               tuple(spec_names._functions.items()), tuple(spec_names._tools.items()), tuple(spec_names._stores))
    if _cache is not None and _cache[0] == version:
        return _cache[1]
    out = palette()
    out["trees"] = {
        name: {"fingerprint": tree.fingerprint, "blackboard": blackboard_schema(tree)}
        for name, tree in sorted(registered_trees().items()) if SPEC_TREE_MARK not in name
    }
    out["types"] = {name: type_schema(cls) for name, cls in sorted(registered_types().items())
                    if getattr(cls, "__module__", "").split(".")[0] != "tasktree_dist"}
    _cache = (version, out)
    return out


def merge_palettes(palettes: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleet's palette: what any live process offers (`tasktree schema --fleet`, checks at submit)."""
    merged: dict[str, Any] = {"functions": {}, "tools": {}, "stores": [], "trees": {}, "types": {}}
    for one in palettes:
        for section in ("functions", "tools", "trees", "types"):
            merged[section].update(one.get(section) or {})
        merged["stores"] = sorted(set(merged["stores"]) | set(one.get("stores") or ()))
    return merged
