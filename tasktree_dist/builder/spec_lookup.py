"""Where a spec's names resolve: this process's registries (building), or a live fleet's palette (checking only:
`validate --fleet`, a submitter without the user's modules)."""

from __future__ import annotations

from typing import Any, Protocol

from ..core.registry import registered_trees
from ..core.serde import registered_types
from . import spec_names


class Names(Protocol):
    """Where names resolve: a registered object, or None when the name is unknown."""

    def function(self, name: str) -> Any: ...
    def tool(self, name: str) -> Any: ...
    def store(self, name: str) -> Any: ...
    def tree(self, name: str) -> Any: ...
    def type(self, name: str) -> Any: ...
    def known(self, what: str) -> list[str]: ...


class LocalNames:
    """This process's registries."""

    def function(self, name: str) -> Any:
        return spec_names.registered_function(name)

    def tool(self, name: str) -> Any:
        return spec_names.registered_tool(name)

    def store(self, name: str) -> Any:
        return spec_names.registered_store(name)

    def tree(self, name: str) -> Any:
        return registered_trees().get(name)

    def type(self, name: str) -> Any:
        types = registered_types()
        key = find_type(types, name)
        return types[key] if key is not None else None

    def known(self, what: str) -> list[str]:
        return {"function": spec_names.function_names, "tool": spec_names.tool_names,
                "store": spec_names.store_names, "tree": lambda: sorted(registered_trees()),
                "type": lambda: sorted(registered_types())}[what]()


class PaletteNames:
    """A live fleet's palette (names only: nothing is built from it)."""

    def __init__(self, palette: dict[str, Any]) -> None:
        self.palette = palette

    def _has(self, section: str, name: str) -> Any:
        return True if name in (self.palette.get(section) or {}) else None

    def function(self, name: str) -> Any:
        return self._has("functions", name)

    def tool(self, name: str) -> Any:
        return self._has("tools", name)

    def store(self, name: str) -> Any:
        return True if name in (self.palette.get("stores") or []) else None

    def tree(self, name: str) -> Any:
        return self._has("trees", name)

    def type(self, name: str) -> Any:
        return True if find_type(self.palette.get("types") or {}, name) is not None else None

    def known(self, what: str) -> list[str]:
        section = self.palette.get({"store": "stores"}.get(what, f"{what}s")) or {}
        return sorted(section)


def find_type(types: dict[str, Any], name: str) -> str | None:
    """The registered name a spec's `blackboard: <name>` means: the exact name, or the class name (`Batch` for
    `app.models:Batch`) when only one registered type has it."""
    if name in types:
        return name
    matches = [key for key in types if key.rpartition(":")[2].rpartition(".")[2] == name]
    return matches[0] if len(matches) == 1 else None
