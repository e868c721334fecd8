"""JSON Schema validation for documents from anyone: self-contained schemas only.

jsonschema fetches a remote `$ref` (`http://...`) by default; a schema submitted with a spec must never make a
fleet process send requests, so every validator here has a registry that retrieves nothing, and a `$ref` it cannot
resolve is a problem of the schema, named.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable


def _retrieve_nothing(uri: str) -> Any:
    raise NoSuchResource(ref=uri)


CLOSED = Registry(retrieve=_retrieve_nothing)  # type: ignore[call-arg]


class SchemaProblem(ValueError):
    """A schema that cannot be used: invalid, or with a `$ref` outside itself; `path` is where in the schema."""

    def __init__(self, message: str, path: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.path = path


def check_schema(schema: dict[str, Any]) -> None:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise SchemaProblem(exc.message, tuple(exc.path)) from None
    for path, ref in _refs(schema, ()):
        if not ref.startswith("#"):
            raise SchemaProblem(f"$ref {ref} cannot be resolved: a schema here is self-contained (no remote "
                                "references)", path)
    errors(schema, None)


def _refs(value: Any, path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], str]]:
    """Every $ref / $dynamicRef in a schema, with its place (a nested remote one is refused before any use)."""
    found: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("$ref", "$dynamicRef") and isinstance(item, str):
                found.append(((*path, key), item))
            else:
                found.extend(_refs(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_refs(item, (*path, index)))
    return found


def errors(schema: dict[str, Any], value: Any) -> list[ValidationError]:
    """What is wrong with `value` under `schema`, sorted by place."""
    try:
        found = list(Draft202012Validator(schema, registry=CLOSED).iter_errors(value))
    except Unresolvable as exc:
        raise SchemaProblem(f"$ref {getattr(exc, 'ref', exc)} cannot be resolved: a schema here is self-contained "
                            "(no remote references)") from None
    return sorted(found, key=lambda error: list(error.absolute_path))
