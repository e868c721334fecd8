"""The JSON Schema of spec documents (`tasktree schema`), generated from the vocabulary so it never drifts from it.

Editors use it for completion and checks as the author types; `tasktree validate` goes further (registered names,
child counts, the builder's own checks) and names each problem's line and column.
"""

from __future__ import annotations

from typing import Any

from .spec_build import VERSION
from .spec_kinds import (
    ATTR_OR_FUNCTION,
    EXPIRATION,
    FUNCTION,
    MESSAGES,
    SCHEMA,
    STORE,
    TEXT_OR_FUNCTION,
    TOOLS,
    TREE,
    VALUE_OR_FUNCTION,
    Kind,
    Param,
    kinds,
)

SCHEMA_ID = "https://tasktree-dist.dev/schemas/spec-v1.json"
_NAME = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_-]*$"}
_FUNCTION_REF = {"type": "object", "properties": {"function": _NAME}, "required": ["function"],
                 "additionalProperties": False}


def _param_schema(param: Param) -> dict[str, Any]:
    form = param.form
    if form == FUNCTION:
        schema: dict[str, Any] = {"anyOf": [_NAME, _FUNCTION_REF, {"type": "null"}]}
    elif form in (ATTR_OR_FUNCTION, TEXT_OR_FUNCTION):
        schema = {"anyOf": [{"type": "string"}, _FUNCTION_REF, {"type": "null"}]}
    elif form == VALUE_OR_FUNCTION:
        schema = {"anyOf": [param.schema or {}, _FUNCTION_REF]}
    elif form in (STORE, TREE):
        schema = _NAME
    elif form == TOOLS:
        schema = {"anyOf": [{"type": "array", "items": _NAME}, _FUNCTION_REF]}
    elif form == MESSAGES:
        message = {"type": "object", "properties": {"role": {"type": "string"}}, "required": ["role"]}
        schema = {"anyOf": [{"type": "array", "items": message}, _FUNCTION_REF]}
    elif form == SCHEMA:
        schema = {"anyOf": [{"type": "object", "description": "a JSON Schema"},
                            {"type": "string", "description": "a registered pydantic model's name"}, {"type": "null"}]}
    elif form == EXPIRATION:
        schema = {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"},
                            {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}]}
    else:
        schema = dict(param.schema)
    if param.description:
        schema = {**schema, "description": param.description}
    return schema


def _kind_schema(kind: Kind) -> dict[str, Any]:
    properties: dict[str, Any] = {"kind": {"const": kind.name}, "name": {"type": "string", "pattern": "^[^/]*$"}}
    properties.update({param.name: _param_schema(param) for param in kind.params})
    low, high = kind.children
    if high:
        children: dict[str, Any] = {"type": "array", "items": {"$ref": "#/$defs/node"}, "minItems": low}
        if high != float("inf"):
            children["maxItems"] = int(high)
        properties["children"] = children
    required = ["kind", *(p.name for p in kind.params if p.required)]
    if low:
        required.append("children")
    return {"type": "object", "description": kind.description, "properties": properties, "required": required,
            "additionalProperties": False}


def _agent_schema() -> dict[str, Any]:
    tool = {"anyOf": [_NAME, {"type": "object", "properties": {"agent": {"$ref": "#/$defs/agent"}},
                                                   "required": ["agent"]}]}
    connection = {"type": "object", "properties": {"base_url": {"type": "string"},
                                                      "api_key_env": {"type": "string"},
                                                      "api_key": {"type": "string"}},
                  "required": ["base_url"], "additionalProperties": False}
    return {
        "type": "object",
        "properties": {
            "tasktree": {"const": VERSION}, "kind": {"const": "agent"}, "name": _NAME,
            "description": {"type": "string"}, "prompt": {"type": "string"}, "system": {"type": "string"},
            "vars": {"type": "object"}, "blackboard": {"type": "object"},
            "tools": {"type": "array", "items": tool},
            "llm": {"type": "object", "properties": {"model": {"type": "string"}, "connection": _NAME,
                                                     "temperature": {"type": "number"}},
                    "required": ["model"]},
            "connections": {"type": "object", "additionalProperties": connection},
            "max_iterations": {"type": "integer", "minimum": 1},
            "max_total_tokens": {"type": "integer", "minimum": 1},
            "pre_hook": _NAME, "post_hook": _NAME,
        },
        "required": ["name", "prompt", "llm"],
        "additionalProperties": False,
    }


def _node_schema(names: list[str]) -> dict[str, Any]:
    """A node is the branch its `kind` names. Chosen by `if kind == ...` rather than `oneOf` over every kind: oneOf
    checks a node against every branch, and each branch with `children` checks the whole subtree again, so the
    work grew with (kinds with children) ** depth (12 s for one document of every kind); here it is linear."""
    return {
        "type": "object",
        "properties": {"kind": {"enum": names}},
        "required": ["kind"],
        "allOf": [{"if": {"properties": {"kind": {"const": name}}}, "then": {"$ref": f"#/$defs/{name}"}}
                  for name in names],
    }


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of spec documents (tree and agent), one branch per node kind."""
    node_kinds = kinds()
    tree = {
        "type": "object",
        "properties": {
            "tasktree": {"const": VERSION, "description": "the spec format version"},
            "kind": {"const": "tree"}, "name": _NAME, "description": {"type": "string"},
            "blackboard": {"anyOf": [{"type": "object", "description": "a JSON Schema"},
                                     {"type": "string", "description": "a registered type's name"}]},
            "vars": {"type": "object", "description": "defaults of the $names"},
            "root": {"$ref": "#/$defs/node"},
        },
        "required": ["tasktree", "name", "root"],
        "additionalProperties": False,
    }
    agent = {**_agent_schema(), "required": ["tasktree", "kind", "name", "prompt", "llm"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "tasktree_dist spec document",
        "oneOf": [tree, agent],
        "$defs": {
            "node": _node_schema(sorted(node_kinds)),
            "agent": _agent_schema(),
            **{name: _kind_schema(kind) for name, kind in sorted(node_kinds.items())},
        },
    }
