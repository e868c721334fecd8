"""Built tree -> spec document (`tree.to_spec()`): every parameter written in its form, code by registered name.

A tree built from a spec gives its document back. A code tree is written node by node; a callable, store or tool
that is not registered is named with the node's address in the SpecError, so the author knows what to register.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ..core.callables import callable_name
from ..core.serde import registered_name
from . import spec_names
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
    Param,
    kind_of_node,
)
from .spec_source import Problem, SpecError


def tree_to_spec(tree: Any) -> dict[str, Any]:
    stored = getattr(tree, "spec", None)
    if stored is not None:
        return _copy(stored)
    if tree.root is None or not tree.fingerprint:
        raise SpecError([Problem(f"{tree!r} is not built yet (call .End() first)")])
    writer = _Writer()
    root = writer.node(tree.root)
    if writer.problems:
        raise SpecError(writer.problems)
    document: dict[str, Any] = {"tasktree": VERSION, "name": tree.name}
    kind = tree.blackboard_type
    if kind is not None:
        type_name = registered_name(kind)
        if type_name is None:
            raise SpecError([Problem(f"blackboard type {kind.__name__} is not registered (register_type)")])
        document["blackboard"] = type_name
    elif getattr(tree, "blackboard_schema", None):
        document["blackboard"] = tree.blackboard_schema
    document["root"] = root
    return document


def values_none_kept(kind: str) -> tuple[str, ...]:
    """Parameters whose null is a value, not an absence (a WaitFor's `default: null` is a default)."""
    return ("default",) if kind == "WaitFor" else ()


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


class _Writer:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def fail(self, node: Any, param: Param, message: str) -> None:
        self.problems.append(Problem(f"{node.describe()}: {param.name}: {message}", node.address))

    def node(self, node: Any) -> dict[str, Any]:
        kind = kind_of_node(node)
        if kind is None:
            self.problems.append(Problem(f"{node.describe()}: node kind {node.KIND!r} has no spec form "
                                         "(register_kind)", node.address))
            return {}
        out: dict[str, Any] = {"kind": kind.name}
        if node.name != kind.default_name(node):
            out["name"] = node.name
        values = kind.read(node)
        for param in kind.params:
            value = values.get(param.name)
            if value is None and param.name in values and param.name in values_none_kept(kind.name):
                out[param.name] = None
                continue
            if value is None or (param.name == "enabled" and value is True):
                continue
            written = self.value(node, param, value)
            if written is not None:
                out[param.name] = written
        children = node.children()
        if children:
            out["children"] = [self.node(child) for child in children]
        return out

    def function(self, node: Any, param: Param, fn: Any) -> str | None:
        name = spec_names.name_of_function(fn)
        if name is None:
            self.fail(node, param, f"function {callable_name(fn)!r} is not registered (register_function)")
        return name

    def value(self, node: Any, param: Param, value: Any) -> Any:
        form = param.form
        if form == FUNCTION:
            return self.function(node, param, value)
        if form in (ATTR_OR_FUNCTION, TEXT_OR_FUNCTION, VALUE_OR_FUNCTION, TOOLS, MESSAGES) and callable(value):
            spec_messages = getattr(value, "spec_messages", None)
            if spec_messages is not None:
                return _copy(spec_messages)
            name = self.function(node, param, value)
            return {"function": name} if name else None
        if form == STORE:
            name = spec_names.name_of_store(value)
            if name is None:
                self.fail(node, param, f"store {type(value).__name__} is not registered (register_store)")
            return name
        if form == TREE:
            return value.name
        if form == TOOLS:
            names = []
            for tool in value:
                name = spec_names.name_of_tool(tool)
                if name is None:
                    self.fail(node, param, f"tool {getattr(tool, 'NAME', tool)!r} is not registered (register_tool)")
                names.append(name)
            return names
        if form == MESSAGES:
            return [_escaped(m) for m in value]
        if form == SCHEMA:
            if isinstance(value, type):
                name = registered_name(value)
                if name is None:
                    self.fail(node, param, f"type {value.__name__} is not registered (register_type)")
                return name
            return _copy(value)
        if form == EXPIRATION:
            if isinstance(value, _dt.timedelta):
                return value.total_seconds()
            if isinstance(value, tuple | list):
                return [v.total_seconds() if isinstance(v, _dt.timedelta) else v for v in value]
            return value
        if hasattr(value, "model") and not isinstance(value, str | dict | list):  # an LLMModel
            self.fail(node, param, f"{type(value).__name__} objects have no spec form: give the model's name")
            return None
        return _copy(value)


def _escaped(message: Any) -> Any:
    """A literal message from code: its braces doubled, so the spec does not read them as {field} references."""
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return {**message, "content": message["content"].replace("{", "{{").replace("}", "}}")}
    return _copy(message)
