"""Trees by name.

A worker process rebuilds the same trees by importing the same modules and finds them here by name; their
fingerprint (nodes.structure) lets it refuse a unit addressed to a different version of a tree.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from .errors import TasktreeError


class RegisteredTree(Protocol):
    """A built tree (builder.Tree; not imported: the builder registers each tree here)."""

    name: str
    fingerprint: str
    nodes: dict[str, Any]

    def node(self, address: str) -> Any: ...


#: Weak: a tree lives as long as something holds it (the module that built it at import time, a running Gather),
#: so trees built per request under fresh names do not pile up in a long-lived process.
_trees: weakref.WeakValueDictionary[str, RegisteredTree] = weakref.WeakValueDictionary()


class UnknownTreeError(TasktreeError, LookupError):
    pass


def register_tree(tree: RegisteredTree) -> None:
    """Remember `tree` under its name while it is alive; a later tree of the same name replaces it (rebuilt
    module, new version)."""
    _trees[tree.name] = tree


def get_tree(name: str) -> RegisteredTree:
    try:
        return _trees[name]
    except KeyError:
        known = ", ".join(sorted(_trees)[:20]) or "none"
        raise UnknownTreeError(f"tree {name!r} is not registered in this process (registered: {known})") from None


def registered_trees() -> dict[str, RegisteredTree]:
    return dict(_trees)
