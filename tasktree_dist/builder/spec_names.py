"""The closed vocabulary of specs: the functions, tools and stores a process registered, by name.

A spec names code; it never imports it. Whatever a spec may call is put here by the process's own code
(`register_function`, `register_tool`, `register_store`; types with `register_type`, trees by building them), so
loading a document can only reach what the modules listed in TASKTREE_IMPORTS chose to offer. The palette
(`palette()`) is that vocabulary with its schemas, published with each worker's heartbeat.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

from ..core.errors import TasktreeProgrammingError

F = TypeVar("F", bound=Callable[..., Any])

#: A registered name: a word, with `-` allowed. No dots or colons: those would read as a module path.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")
#: What an import path looks like (`pkg.mod:attr`, `os.system`): refused in specs with its own message.
IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*([.:][A-Za-z_][\w]*)+")

_functions: dict[str, Callable[..., Any]] = {}
_schemas: dict[str, dict[str, Any]] = {}
_tools: dict[str, Any] = {}
_stores: dict[str, Any] = {}


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TasktreeProgrammingError(
            f"{what} name must be a word (letters, digits, _ and -, no dots or colons), got {name!r}")
    return name


@overload
def register_function(name: str, fn: F, *, input_schema: dict[str, Any] | None = None,
                      output_schema: dict[str, Any] | None = None) -> F: ...
@overload
def register_function(name: str | None = None, fn: None = None, *, input_schema: dict[str, Any] | None = None,
                      output_schema: dict[str, Any] | None = None) -> Callable[[F], F]: ...
@overload
def register_function(name: F, fn: None = None, *, input_schema: dict[str, Any] | None = None,
                      output_schema: dict[str, Any] | None = None) -> F: ...


def register_function(name: Any = None, fn: Any = None, *, input_schema: dict[str, Any] | None = None,
                      output_schema: dict[str, Any] | None = None) -> Any:
    """Offer `fn` to specs under `name`: `register_function("load", load)`, `@register_function("load")` or
    `@register_function` (the function's own name). The schemas (else derived from the annotations) are shown in
    the fleet's palette; a later registration of the same name replaces the earlier one (a reloaded module)."""
    if callable(name) and fn is None:
        return register_function(name.__name__, name, input_schema=input_schema, output_schema=output_schema)
    if fn is None:
        return lambda func: register_function(name or func.__name__, func, input_schema=input_schema,
                                              output_schema=output_schema)
    check_name(name, "register_function:")
    if not callable(fn):
        raise TasktreeProgrammingError(f"register_function({name!r}): expected a callable, got {fn!r}")
    _functions[name] = fn
    _schemas[name] = {"input": input_schema or _input_schema(fn), "output": output_schema or _output_schema(fn)}
    return fn


def register_tool(tool: Any) -> Any:
    """Offer an LLM tool (a Tool instance, or a Tool class taking no arguments) to specs under its NAME."""
    instance = tool() if isinstance(tool, type) else tool
    name = check_name(getattr(instance, "NAME", None), "register_tool: the tool's NAME")
    if not callable(getattr(instance, "execute", None)) or not callable(getattr(instance, "openai_schema", None)):
        raise TasktreeProgrammingError(f"register_tool: {tool!r} is not a Tool (no execute/openai_schema)")
    _tools[name] = instance
    return tool


def register_store(name: str, store: Any) -> Any:
    """Offer a cache/termination store (Cacher, Terminable: `store: <name>` in a spec)."""
    _stores[check_name(name, "register_store:")] = store
    return store


def registered_function(name: str) -> Callable[..., Any] | None:
    return _functions.get(name)


def registered_tool(name: str) -> Any:
    return _tools.get(name)


def registered_store(name: str) -> Any:
    return _stores.get(name)


def function_names() -> list[str]:
    return sorted(_functions)


def tool_names() -> list[str]:
    return sorted(_tools)


def store_names() -> list[str]:
    return sorted(_stores)


def name_of_function(fn: Any) -> str | None:
    """The name `fn` is registered under (identity, the newest registration first), for `to_spec`."""
    for name in reversed(list(_functions)):
        if _functions[name] is fn:
            return name
    return None


def name_of_tool(tool: Any) -> str | None:
    for name, registered in _tools.items():
        if registered is tool or (type(registered) is type(tool) and name == getattr(tool, "NAME", None)):
            return name
    return None


def name_of_store(store: Any) -> str | None:
    return next((name for name, registered in _stores.items() if registered is store), None)


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no schema, not an error
        return {}


def _schema_of(annotation: Any) -> dict[str, Any]:
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(annotation).json_schema()
    except Exception:  # noqa: BLE001 - a type pydantic cannot describe: shown as "anything"
        return {}


def _input_schema(fn: Any) -> dict[str, Any]:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return {}
    annotation = _hints(fn).get(params[0].name) if params else None
    return _schema_of(annotation) if annotation is not None else {}


def _output_schema(fn: Any) -> dict[str, Any]:
    annotation = _hints(fn).get("return")
    return _schema_of(annotation) if annotation is not None else {}


def palette() -> dict[str, Any]:
    """Every function, tool and store registered here, with schemas; trees are added by the caller."""
    return {
        "functions": {name: dict(_schemas.get(name, {})) for name in sorted(_functions)},
        "tools": {name: {"description": tool.description() if hasattr(tool, "description") else "",
                         "input": getattr(tool, "SCHEMA", {}), "output": {}}
                  for name, tool in sorted(_tools.items())},
        "stores": sorted(_stores),
    }
