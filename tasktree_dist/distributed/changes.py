"""Blackboard changes: computed on the worker, merged across Parallel branches, applied in place by the coordinator.

A change per top-level field:
- `{"op": "set", "value": v}` replaces the field;
- `{"op": "append", "items": [...]}` when the old list is a prefix of the new one (so branch appends concatenate);
- `{"op": "dict", "set": {...}, "del": [...]}` for key-level changes of a plain dict field;
- `{"op": "del"}` when a key of a dict blackboard was removed.
Values are serde-encoded JSON. Applying changes mutates the caller's objects (lists are extended, dicts updated)
so references the user holds stay valid.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import TasktreeError
from ..core.serde import TAG, decode_value


class BlackboardConflictError(TasktreeError):
    """Two Parallel branches wrote different values to the same field: no write is silently lost."""


def encoded_fields(encoded: Any) -> dict[str, Any] | None:
    """The top-level fields of an encoded blackboard (a registered object or a plain dict)."""
    if isinstance(encoded, dict):
        if encoded.get(TAG) == "obj":
            return encoded["fields"]
        if TAG not in encoded:
            return encoded
    return None


def _field_change(before: Any, after: Any) -> dict[str, Any] | None:
    if before == after:
        return None
    both_lists = isinstance(before, list) and isinstance(after, list)
    if both_lists and len(after) > len(before) and after[: len(before)] == before:
        return {"op": "append", "items": after[len(before):]}
    if isinstance(before, dict) and isinstance(after, dict) and TAG not in before and TAG not in after:
        return {
            "op": "dict",
            "set": {k: v for k, v in after.items() if before.get(k, _MISSING) != v},
            "del": [k for k in before if k not in after],
        }
    return {"op": "set", "value": after}


_MISSING = object()


def diff(before: Any, after: Any) -> dict[str, Any]:
    """Changes turning encoded blackboard `before` into encoded `after`."""
    old, new = encoded_fields(before), encoded_fields(after)
    if old is None or new is None:
        return {} if before == after else {"": {"op": "set", "value": after}}
    changes: dict[str, Any] = {}
    for name, value in new.items():
        change = _field_change(old.get(name, _MISSING), value) if name in old else {"op": "set", "value": value}
        if change is not None:
            changes[name] = change
    for name in old:
        if name not in new:
            changes[name] = {"op": "del"}
    return changes


def merge(branches: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge Parallel branches' changes (in branch order); raise BlackboardConflictError on a lost write."""
    merged: dict[str, Any] = {}
    writers: dict[str, list[str]] = {}
    for branch, changes in branches:
        for name, change in changes.items():
            writers.setdefault(name, []).append(branch)
            current = merged.get(name)
            if current is None:
                merged[name] = _own_copy(change)
                continue
            if current["op"] == change["op"] == "append":
                current["items"] = current["items"] + change["items"]
            elif current["op"] == change["op"] == "dict":
                for key, value in change["set"].items():
                    if key in current["set"] and current["set"][key] != value:
                        raise _conflict(f"{name}[{key!r}]", writers[name])
                    current["set"][key] = value
                current["del"] += [k for k in change["del"] if k not in current["del"]]
            elif current == change:
                continue
            else:
                raise _conflict(name, writers[name])
    return merged


def _own_copy(change: dict[str, Any]) -> dict[str, Any]:
    """A copy whose containers merge() may extend without touching the branch's change."""
    if change["op"] == "dict":
        return {**change, "set": dict(change["set"]), "del": list(change["del"])}
    return dict(change)


def _conflict(field: str, branches: list[str]) -> BlackboardConflictError:
    return BlackboardConflictError(
        f"Parallel branches {', '.join(branches)} wrote different values to blackboard field {field!r}; "
        "write disjoint fields, append to a list, or set dict keys instead"
    )


def apply(blackboard: Any, changes: dict[str, Any]) -> None:
    """Apply changes to `blackboard` in place (objects the caller holds stay the same objects)."""
    is_dict = isinstance(blackboard, dict)
    for name, change in changes.items():
        op = change["op"]
        if name == "":
            raise TasktreeError("a unit replaced a blackboard that is neither a dict nor a registered object")
        if op == "del":
            blackboard.pop(name, None) if is_dict else delattr(blackboard, name)
            continue
        current = blackboard.get(name) if is_dict else getattr(blackboard, name, None)
        if op == "append" and isinstance(current, list):
            current.extend(decode_value(change["items"]))
            continue
        if op == "dict" and isinstance(current, dict):
            current.update(decode_value(change["set"]))
            for key in change["del"]:
                current.pop(key, None)
            continue
        value = decode_value(change["value"] if op == "set" else change.get("items", change.get("set")))
        if is_dict:
            blackboard[name] = value
        else:
            object.__setattr__(blackboard, name, value)
