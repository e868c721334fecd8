"""The children of a large fan-out that its coordinator did not keep in memory, read back from unit records.

A distributed Gather of more than TASKTREE_TRACE_FANOUT_MAX children keeps its first ones (and failed ones) in the
run's trace; the trace JSON marks the fan-out with `paged` (how many, the unit id pattern). Each child's trace is
in its unit record (worker fragment plus what the coordinator adds), so nothing is written twice: a page is one
HMGET.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..core.trace import TraceNode
from ..distributed.protocol import Completion
from .store import RunStore

#: Most children one page request reads.
PAGE_MAX = 1000


def paged_nodes(trace: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of a trace JSON that has paged children."""
    stack = [trace]
    while stack:
        node = stack.pop()
        if node.get("paged"):
            yield node
        stack.extend((node.get("children") or {}).values())


def find_node(trace: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = trace
    for key in path:
        node = (node.get("children") or {}).get(key) if node is not None else None
    return node


def child_json(record: bytes, parent: TraceNode) -> dict[str, Any]:
    """A child's trace JSON from its unit record, as the coordinator would have grafted it."""
    node = TraceNode("", "Tree", parent)
    Completion.from_record(record).fill(node)
    return node.json()


async def read_children(store: RunStore, run_id: str, paged: dict[str, Any], offset: int, limit: int
                        ) -> dict[str, Any]:
    """Children offset..offset+limit of a paged fan-out (in index order; the kept ones included), as trace JSON
    keyed like the trace's own children. Children not finished yet are counted in `missing`."""
    total = int(paged.get("total") or 0)
    pattern = str(paged.get("unit") or "")
    limit = max(1, min(limit, PAGE_MAX))
    offset = max(0, offset)
    indices = range(offset, min(total, offset + limit))
    records = await store.unit_records(run_id, [pattern.replace("{i}", str(i)) for i in indices])
    parent = TraceNode("fanout", "Gather")
    children: dict[str, Any] = {}
    for record in records:
        if record is not None:
            data = child_json(record, parent)
            children[str(data["name"])] = data
    following = offset + limit
    return {"offset": offset, "limit": limit, "total": total, "children": children,
            "missing": len(indices) - len(children), "next": following if following < total else None}


async def expand(store: RunStore, run_id: str, trace: dict[str, Any]) -> dict[str, Any]:
    """The trace with every paged child read back in (for saving a whole trace to a file); kept children stay."""
    for node in list(paged_nodes(trace)):
        paged = node.pop("paged")
        children = node.setdefault("children", {})
        offset = 0
        while offset < int(paged.get("total") or 0):
            page = await read_children(store, run_id, paged, offset, PAGE_MAX)
            for key, child in page["children"].items():
                children.setdefault(key, child)
            offset += PAGE_MAX
        node["children"] = dict(sorted(children.items(), key=lambda kv: _index(kv[0])))
    return trace


def _index(key: str) -> int:
    head = key.split("_", 1)[0]
    return int(head) if head.isdigit() else -1
