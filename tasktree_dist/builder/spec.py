"""Specs, the entry points: a document (a tree or an agent) built into a tree, or checked.

`Tree.from_spec` and the fleet build through `build_tree`; `tasktree validate`, submitters and the HTTP API check
through `validate` (against this process's registries, or a live fleet's palette when given one).
"""

from __future__ import annotations

from typing import Any

from .spec_agent import build_agent, check_agent
from .spec_build import build_plain_tree, check_tree
from .spec_lookup import LocalNames, Names, PaletteNames
from .spec_source import Problem, SpecError, parse


def _is_agent(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == "agent"


def build_tree(tree_class: Any, document: Any, variables: dict[str, Any] | None = None, source: str = "",
               name: str | None = None) -> Any:
    """The tree a document describes, built and registered (under `name` when given)."""
    doc = parse(document, source)
    if _is_agent(doc.data):
        return build_agent(tree_class, doc, variables or {}, name)
    return build_plain_tree(tree_class, doc, variables or {}, name)


def validate(document: Any, variables: dict[str, Any] | None = None, source: str = "",
             palette: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem of a document, checked against this process's registries, or a fleet's palette."""
    try:
        doc = parse(document, source)
    except SpecError as exc:
        return exc.problems
    names: Names = PaletteNames(palette) if palette is not None else LocalNames()
    if _is_agent(doc.data):
        return check_agent(doc, variables or {}, names)
    return check_tree(doc, variables or {}, names, build=palette is None)
