"""Reading a spec document: YAML or JSON text (or an already parsed dict) into plain data, with the line and column
of every value, so each problem can be named where the author wrote it.

Limits that protect a process reading documents from anyone (the HTTP API takes them): at most 1 MB of text, 64
levels of nesting, no YAML aliases (a few lines of anchors expand to gigabytes) and no tags beyond YAML's own
(PyYAML's safe constructor resolves scalars; nothing is ever instantiated from a document).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from ..core.errors import TasktreeError

#: libyaml's parser when PyYAML has it (the same marks): a 3 KB spec builds in 3 ms instead of 9.5 ms. A document it
#: refuses is read again by PyYAML's parser, whose errors point at the place rather than the end of the input.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_BYTES = 1 << 20
MAX_DEPTH = 64


@dataclass
class Problem:
    """One thing wrong with a document: what, at which JSON pointer, and where in the text when it came as text."""

    message: str
    pointer: str = ""
    line: int | None = None
    column: int | None = None

    def where(self) -> str:
        if self.line is not None:
            return f"{self.line}:{self.column}"
        return self.pointer or "/"

    def __str__(self) -> str:
        return f"{self.where()}: {self.message}"


class SpecError(TasktreeError, ValueError):
    """A spec that cannot be built; `problems` lists each one with its place (line:col, or a JSON pointer)."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}:" if source else ""
        shown = "; ".join(f"{prefix}{problem}" for problem in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"invalid spec: {shown}{more}")


def pointer(path: tuple[Any, ...] | list[Any]) -> str:
    """RFC 6901 pointer of a path of keys and indices."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


@dataclass
class Document:
    """Parsed data plus the positions of its values (pointer -> 1-based line, column), empty for a dict input."""

    data: Any
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    source: str = ""

    def problem(self, message: str, path: tuple[Any, ...] | list[Any] | str) -> Problem:
        where = path if isinstance(path, str) else pointer(path)
        probe = where
        while True:  # the nearest enclosing value that has a position
            if probe in self.positions:
                line, column = self.positions[probe]
                return Problem(message, where, line, column)
            if not probe:
                return Problem(message, where)
            probe = probe.rpartition("/")[0]


def parse(document: Any, source: str = "") -> Document:
    """A dict as it is (checked for depth), or YAML/JSON text (str or bytes) read with positions."""
    if isinstance(document, dict):
        depth = _depth(document)
        if depth > MAX_DEPTH:
            raise SpecError([Problem(f"the document nests {depth} levels deep; at most {MAX_DEPTH} are allowed")],
                            source)
        return Document(document, {}, source)
    if isinstance(document, bytes | bytearray):
        if len(document) > MAX_BYTES:
            raise _too_large(len(document), source)
        try:
            document = bytes(document).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError([Problem(f"not UTF-8 text: {exc}")], source) from None
    if not isinstance(document, str):
        raise SpecError([Problem(f"a spec is a dict or YAML/JSON text, got {type(document).__name__}")], source)
    size = len(document.encode("utf-8"))
    if size > MAX_BYTES:
        raise _too_large(size, source)
    reader = _Reader(source)
    try:
        try:
            node = yaml.compose(document, Loader=_LOADER)
        except yaml.YAMLError:
            if _LOADER is yaml.SafeLoader:
                raise
            node = yaml.compose(document, Loader=yaml.SafeLoader)  # PyYAML's own parser names the place better
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise SpecError([Problem(f"not YAML/JSON: {exc.problem or exc.context}", "", line, column)], source) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(f"not YAML/JSON: {exc}")], source) from None
    except RecursionError:
        raise SpecError([Problem(f"the document nests too deep; at most {MAX_DEPTH} levels are allowed")],
                        source) from None
    if node is None:
        raise SpecError([Problem("the document is empty")], source)
    data = reader.value(node, (), 0)
    return Document(data, reader.positions, source)


def _too_large(size: int, source: str) -> SpecError:
    return SpecError([Problem(f"the document is {size} bytes; at most {MAX_BYTES} (1 MB) are allowed")], source)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class _Reader:
    """YAML nodes to plain values, recording each value's mark; aliases, unknown tags and deep nesting refused."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.positions: dict[str, tuple[int, int]] = {}
        self.constructor = SafeConstructor()
        self.seen: set[int] = set()

    def fail(self, message: str, node: yaml.Node, path: tuple[Any, ...]) -> SpecError:
        mark = node.start_mark
        return SpecError([Problem(message, pointer(path), mark.line + 1, mark.column + 1)], self.source)

    def value(self, node: yaml.Node, path: tuple[Any, ...], depth: int) -> Any:
        if id(node) in self.seen:
            raise self.fail("YAML aliases (*name) are not allowed in specs", node, path)
        self.seen.add(id(node))
        self.positions[pointer(path)] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and depth >= MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels", node, path)
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise self.fail(f"tag {node.tag} is not allowed", node, path)
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self.fail("YAML merge keys (<<) are not allowed in specs", key_node, path)
                key = self.value(key_node, (*path, "(key)"), depth + 1)
                if not isinstance(key, str):
                    raise self.fail(f"keys must be strings, got {key!r}", key_node, path)
                if key in out:
                    raise self.fail(f"duplicate key {key!r}", key_node, (*path, key))
                out[key] = self.value(value_node, (*path, key), depth + 1)
            self.positions.pop(pointer((*path, "(key)")), None)
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self.fail(f"tag {node.tag} is not allowed", node, path)
            return [self.value(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        try:
            value = self.constructor.construct_object(node, deep=True)
        except ConstructorError as exc:
            raise self.fail(f"cannot read this value: {exc.problem}", node, path) from None
        if not isinstance(value, str | int | float | bool | type(None)):
            raise self.fail(f"only JSON values are allowed, got {type(value).__name__} ({node.tag})", node, path)
        return value


def dumps_yaml(data: Any) -> str:
    """A document as YAML (block style, keys in the order written), for people; JSON is a subset either way."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def canonical_json(data: Any) -> bytes:
    """The bytes a spec is hashed by: sorted keys, no spaces (the same document always hashes the same)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
