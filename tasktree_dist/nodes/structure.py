"""A tree's structure: its fingerprint and the address of every node.

The fingerprint (node kinds, names and static parameters, not code) lets a worker refuse to run a unit addressed
to a different version of a tree; addresses (tree name + path of unique child names) name nodes across processes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .base import Node


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
