"""Trees by name, structural fingerprints and node addresses.

A worker process rebuilds the same trees by importing the same modules; the fingerprint (node kinds, names
and static parameters, not code) lets it refuse to run a unit addressed to a different version of a tree.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from .errors import TasktreeError

if TYPE_CHECKING:
    from ..nodes.base import Node


class RegisteredTree(Protocol):
    """A built tree (core.tree.Tree; not imported: tree.py registers itself here)."""

    name: str
    fingerprint: str
    nodes: dict[str, Node]

    def node(self, address: str) -> Node: ...


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


def structure(node: Node) -> dict[str, Any]:
    return {
        "kind": node.KIND,
        "name": node.trace_name,
        "params": node.static_params(),
        "placement": node.placement,
        "children": [structure(child) for child in node.children()],
    }


def fingerprint(root: Node) -> str:
    encoded = json.dumps(structure(root), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def assign_addresses(tree_name: str, root: Node) -> dict[str, Node]:
    """Give every node its address (tree name + unique child names) and return the address index."""
    index: dict[str, Node] = {}
    stack: list[tuple[Node, str]] = [(root, f"{tree_name}/{root.trace_name}")]
    while stack:
        node, address = stack.pop()
        node.address = address
        index[address] = node
        for child in node.children():
            stack.append((child, f"{address}/{child.trace_name}"))
    return index
