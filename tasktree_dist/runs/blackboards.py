"""A run's blackboard as JSON from anywhere: checked against the tree's JSON Schema at submit (naming the field,
before anything is queued), and made into the tree's blackboard type by the coordinator that runs it."""

from __future__ import annotations

from typing import Any

from .model import SubmitError


def check_blackboard(schema: dict[str, Any] | None, blackboard: Any, tree: str) -> None:
    """Refuse a blackboard (JSON data) that does not fit `schema`, naming each field that is wrong."""
    if not schema or not (blackboard is None or isinstance(blackboard, dict | list | str | int | float | bool)):
        return
    from ..core.json_schemas import SchemaProblem
    from ..core.json_schemas import errors as schema_errors

    try:
        errors = schema_errors(schema, blackboard)
    except SchemaProblem as exc:
        raise SubmitError(f"tree {tree!r}'s blackboard schema cannot be used: {exc}") from None
    if errors:
        shown = "; ".join(f"{'.'.join(str(p) for p in error.absolute_path) or '(the blackboard)'}: {error.message}"
                          for error in errors[:10])
        raise SubmitError(f"the blackboard does not fit tree {tree!r}'s schema: {shown}")


def typed_blackboard(tree: Any, blackboard: Any) -> Any:
    """A JSON blackboard submitted without its type (HTTP, another language) becomes the tree's blackboard type."""
    kind = getattr(tree, "blackboard_type", None)
    if kind is None or not isinstance(blackboard, dict):
        return blackboard
    from pydantic import TypeAdapter

    return TypeAdapter(kind).validate_python(blackboard)
