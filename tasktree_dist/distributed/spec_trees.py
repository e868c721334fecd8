"""Trees the fleet builds from stored specs: a submitted spec is kept in Redis under its hash, and every coordinator
and worker that meets a unit or run of it builds the tree from there, once per process (an LRU of built trees).

Such a tree is registered as `<name>@<spec hash>`: units name it like any tree, two versions of a spec never share
a name, and a new spec needs no redeploy when the functions, tools and trees it names are registered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import orjson

from ..builder.spec import build_tree
from ..builder.spec_build import spec_hash
from ..builder.spec_palette import SPEC_TREE_MARK
from ..builder.tree import Tree
from ..core.errors import TasktreeError
from ..core.registry import get_tree
from . import keys

#: Built spec trees kept per process (the registry holds trees weakly: this keeps the recent ones alive).
BUILT_MAX = 256

_built: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()


class SpecNotFoundError(TasktreeError, LookupError):
    pass


def spec_tree_name(name: str, digest: str) -> str:
    return f"{name}{SPEC_TREE_MARK}{digest}"


async def store_spec(redis: Any, stored: dict[str, Any], ttl: float) -> str:
    """Keep {document, variables} under its hash for `ttl` seconds (renewed by each submit of it)."""
    digest = spec_hash(stored)
    await redis.set(keys.spec(digest), orjson.dumps(stored), ex=max(1, int(ttl)))
    return digest


def build_spec_tree(stored: dict[str, Any], digest: str) -> Any:
    """Build a stored spec ({document, variables}) under its fleet name (cached: one build per process)."""
    with _lock:
        tree = _built.get(digest)
        if tree is not None:
            _built.move_to_end(digest)
            return tree
    tree = build_tree(Tree, stored["document"], stored.get("variables") or {}, source=f"spec {digest}",
                      name=spec_tree_name(stored["document"]["name"], digest))
    with _lock:
        _built[digest] = tree
        while len(_built) > BUILT_MAX:
            _built.popitem(last=False)
    return tree


async def tree_for_spec(redis: Any, digest: str) -> Any:
    with _lock:
        tree = _built.get(digest)
    if tree is not None:
        return tree
    raw = await redis.get(keys.spec(digest))
    if raw is None:
        raise SpecNotFoundError(f"spec {digest} is not stored (expired with its runs, or never submitted)")
    return build_spec_tree(orjson.loads(raw), digest)


async def resolve_tree(redis: Any, name: str) -> Any:
    """The tree registered as `name`, or built from its stored spec when `name` is a spec tree's (`name@hash`)."""
    try:
        return get_tree(name)
    except LookupError:
        if SPEC_TREE_MARK not in name:
            raise
    return await tree_for_spec(redis, name.rpartition(SPEC_TREE_MARK)[2])


def layout(node: Any) -> dict[str, Any]:
    """A built node and its children as the runs board draws them: kind, trace name (how the trace names it)."""
    return {"kind": node.KIND, "name": node.trace_name, "children": [layout(child) for child in node.children()]}


async def store_layout(redis: Any, digest: str, tree: Any, ttl: float) -> None:
    """Written by the coordinator that builds the spec (the submitter cannot: it has not the functions)."""
    view = {"tree": tree.fullname, "root": layout(tree.root)}
    await redis.set(keys.spec_layout(digest), orjson.dumps(view), ex=max(1, int(ttl)))


async def spec_view(redis: Any, digest: str) -> dict[str, Any] | None:
    """The stored spec ({document, variables}) and its layout (None until a coordinator built it)."""
    stored, view = await redis.mget([keys.spec(digest), keys.spec_layout(digest)])
    if stored is None:
        return None
    return {**orjson.loads(stored), "layout": orjson.loads(view) if view else None}
