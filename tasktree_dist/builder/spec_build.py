"""Spec document -> built tree (`Tree.from_spec`), or only the check of one (`tasktree validate`).

Every problem is collected with its place before anything is built, so `validate` reports all of them at once and
`from_spec` raises one SpecError listing them. Names resolve through a `Names` object: this process's registries
(building), or a live fleet's palette (`validate --fleet`: checked, not built).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from ..core.errors import TasktreeError
from ..core.json_schemas import SchemaProblem, check_schema, errors
from . import spec_names
from .spec_kinds import (
    ATTR_OR_FUNCTION,
    EXPIRATION,
    FUNCTION,
    MESSAGES,
    RESERVED_KINDS,
    SCHEMA,
    STORE,
    TEXT_OR_FUNCTION,
    TOOLS,
    TREE,
    VALUE,
    VALUE_OR_FUNCTION,
    Kind,
    Param,
    kind_named,
    kinds,
)
from .spec_lookup import LocalNames, Names
from .spec_source import Document, Problem, SpecError, canonical_json
from .spec_text import VAR, WORD, Path, messages_factory, render_template, substitute, template_fields

VERSION = 1
TREE_KEYS = ("tasktree", "kind", "name", "description", "blackboard", "vars", "root")
NODE_KEYS = ("kind", "name", "children")


def spec_hash(data: Any) -> str:
    """The content address of a (variable-substituted) document."""
    return hashlib.sha256(canonical_json(data)).hexdigest()[:24]


class Builder:
    """One pass over a tree document: checks everything, builds the nodes when `build` is set."""

    def __init__(self, document: Document, names: Names, build: bool = True) -> None:
        self.doc = document
        self.names = names
        self.build = build
        self.problems: list[Problem] = []
        self.schema: dict[str, Any] | None = None
        self.blackboard_type: type | None = None
        #: The built root node (when building and nothing was wrong).
        self.root: Any = None

    def problem(self, message: str, path: Path) -> None:
        self.problems.append(self.doc.problem(message, path))

    # -- the document ---------------------------------------------------------------------------------------------
    def header(self, data: Any, keys: tuple[str, ...], kind: str) -> bool:
        if not isinstance(data, dict):
            self.problem(f"a spec is a mapping (tasktree, name, {'root' if kind == 'tree' else 'prompt'}...), "
                         f"got {type(data).__name__}", ())
            return False
        for key in data:
            if key not in keys:
                self.problem(f"unknown key {key!r} in a {kind} spec (accepted: {', '.join(keys)})", (key,))
        if data.get("tasktree") != VERSION:
            self.problem(f"`tasktree: {VERSION}` is required (the spec format version), got "
                         f"{data.get('tasktree')!r}", ("tasktree",) if "tasktree" in data else ())
        name = data.get("name")
        if not isinstance(name, str) or not spec_names.NAME.fullmatch(name):
            self.problem(f"`name` must be a word (letters, digits, _ and -), got {name!r}",
                         ("name",) if "name" in data else ())
        if "blackboard" in data:
            self.read_blackboard(data["blackboard"], ("blackboard",))
        return True

    def read_blackboard(self, value: Any, path: Path) -> None:
        if isinstance(value, str):
            found = self.names.type(value)
            if found is None:
                self.unknown("type", value, path, "register_type")
            elif isinstance(found, type):
                self.blackboard_type = found
        elif isinstance(value, dict):
            try:
                check_schema(value)
            except SchemaProblem as exc:
                self.problem(f"blackboard is not a valid JSON Schema: {exc}", path + exc.path)
            else:
                self.schema = value
        else:
            self.problem("blackboard is a JSON Schema (a mapping) or a registered type's name", path)

    def unknown(self, what: str, name: Any, path: Path, how: str) -> None:
        if isinstance(name, str) and spec_names.IMPORT_PATH.fullmatch(name):
            self.problem(f"{name!r} looks like a module/attribute path: specs never import code, they name "
                         f"registered {what}s ({how})", path)
            return
        known = self.names.known(what)
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
        self.problem(f"{what} {name!r} is not registered ({how}; registered: {shown})", path)

    # -- nodes ----------------------------------------------------------------------------------------------------
    def node(self, data: Any, path: Path) -> Any:
        if not isinstance(data, dict):
            self.problem(f"a node is a mapping with a `kind`, got {type(data).__name__}", path)
            return None
        kind_name = data.get("kind")
        kind = kind_named(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            self.bad_kind(kind_name, path)
            return None
        accepted = {p.name for p in kind.params}
        for key in data:
            if key not in NODE_KEYS and key not in accepted:
                shown = ", ".join([*NODE_KEYS[1:], *sorted(accepted)])
                self.problem(f"unknown parameter {key!r} for {kind.name} (accepted: {shown})", path + (key,))
        named_by_param = kind.param("name") is not None  # WaitFor: its `name` is the signal's (and the node's)
        name = data.get("name", "")
        if not named_by_param and (not isinstance(name, str) or "/" in name):
            self.problem(f"name must be a string without '/', got {name!r}", path + ("name",))
            name = ""
        kwargs: dict[str, Any] = {}
        for param in kind.params:
            if param.name in data:
                kwargs[param.name] = self.param(param, data[param.name], path + (param.name,))
            elif param.required:
                self.problem(f"{kind.name} needs `{param.name}`", path)
        joint = kind.check(data)
        if joint:
            self.problem(f"{kind.name}: {joint}", path)
        children = self.children(kind, data, path)
        if not self.build or self.problems:
            return None
        arguments = {k: v for k, v in kwargs.items() if v is not _DEFAULT}
        if not named_by_param:
            arguments["name"] = name
        try:
            node = kind.make(**arguments)
        except (TasktreeError, TypeError, ValueError) as exc:
            self.problem(f"{kind.name}: {exc}", path)
            return None
        for index, child in enumerate(children):
            try:
                node.append_child(child)
            except TasktreeError as exc:
                self.problem(str(exc), path + ("children", index))
        return node

    def bad_kind(self, kind_name: Any, path: Path) -> None:
        where = path + ("kind",) if isinstance(kind_name, str) else path
        if kind_name is None:
            self.problem("a node needs a `kind` (Sequence, Function, LLM...)", path)
        elif kind_name in RESERVED_KINDS:
            self.problem(f"kind {kind_name!r} is not available in this version of tasktree_dist", where)
        elif isinstance(kind_name, str) and spec_names.IMPORT_PATH.fullmatch(kind_name):
            self.problem(f"kind {kind_name!r} looks like a module/attribute path: node kinds are a closed list "
                         f"({', '.join(sorted(kinds()))})", where)
        else:
            self.problem(f"unknown node kind {kind_name!r} (known: {', '.join(sorted(kinds()))})", where)

    def children(self, kind: Kind, data: dict[str, Any], path: Path) -> list[Any]:
        raw = data.get("children", [])
        if not isinstance(raw, list):
            self.problem("children is a list of nodes", path + ("children",))
            return []
        low, high = kind.children
        if not low <= len(raw) <= high:
            expected = (f"exactly {low}" if low == high else f"at least {low}" if high == float("inf")
                        else f"{low} to {int(high)}")
            self.problem(f"{kind.name} needs {expected} child node(s), has {len(raw)}",
                         path + ("children",) if "children" in data else path)
        return [self.node(child, path + ("children", i)) for i, child in enumerate(raw)]

    # -- parameters -----------------------------------------------------------------------------------------------
    def param(self, param: Param, value: Any, path: Path) -> Any:
        form = param.form
        if form == VALUE:
            return value if self.valid(param.schema, value, path, param.name) else None
        if form == FUNCTION:
            if value is None:
                return _DEFAULT
            return self.function(value, path, plain_name=True)
        if isinstance(value, dict) and set(value) == {"function"}:
            if form in (ATTR_OR_FUNCTION, TEXT_OR_FUNCTION, VALUE_OR_FUNCTION, TOOLS, MESSAGES):
                return self.function(value, path)
        if form in (ATTR_OR_FUNCTION, TEXT_OR_FUNCTION):
            if value is None and form == ATTR_OR_FUNCTION:
                return None
            if not isinstance(value, str):
                self.problem(f"{param.name} is a string or {{function: <registered name>}}, got {value!r}", path)
            elif form == ATTR_OR_FUNCTION and value.startswith("_"):
                self.problem(f"{param.name}: {value!r}: a spec reads and writes public fields only (no leading _)",
                             path)
            return value
        if form == VALUE_OR_FUNCTION:
            return value if self.valid(param.schema, value, path, param.name) else None
        if form == STORE:
            return self.lookup("store", value, path, "register_store")
        if form == TREE:
            return self.lookup("tree", value, path, "build the tree in a module the processes import")
        if form == TOOLS:
            if not isinstance(value, list):
                self.problem("tools is a list of registered tool names or {function: <name>}", path)
                return None
            found = [self.lookup("tool", item, path + (i,), "register_tool") for i, item in enumerate(value)]
            return found
        if form == MESSAGES:
            return self.messages(value, path)
        if form == EXPIRATION:
            return self.expiration(value, path)
        if form == SCHEMA:
            return self.payload_schema(value, path)
        raise AssertionError(f"unknown parameter form {form!r}")

    def valid(self, schema: dict[str, Any], value: Any, path: Path, what: str) -> bool:
        if not schema:
            return True
        error = next(iter(errors(schema, value)), None)
        if error is not None:
            self.problem(f"{what}: {error.message}", path + tuple(error.absolute_path))
            return False
        return True

    def function(self, value: Any, path: Path, plain_name: bool = False) -> Any:
        name = value.get("function") if isinstance(value, dict) and set(value) == {"function"} else (
            value if plain_name else None)
        if not isinstance(name, str):
            self.problem(f"a function is named by a string{' or {function: <name>}' if plain_name else ''}, "
                         f"got {value!r}", path)
            return None
        return self.lookup("function", name, path, "register_function")

    def lookup(self, what: str, name: Any, path: Path, how: str) -> Any:
        if not isinstance(name, str):
            self.problem(f"a {what} is named by a string, got {name!r}", path)
            return None
        found = getattr(self.names, what)(name)
        if found is None and VAR.search(name):
            return None  # a $name without a value: already reported
        if found is None:
            self.unknown(what, name, path, how)
        return found

    def messages(self, value: Any, path: Path) -> Any:
        if not isinstance(value, list):
            self.problem("messages is a list of {role, content} or {function: <name>}", path)
            return None
        templated = False
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                self.problem("each message is a mapping with a `role` and a `content`", path + (i,))
                continue
            content = message.get("content")
            if not isinstance(content, str):
                continue
            for field in template_fields(content):
                templated = True
                self.check_field(field, path + (i, "content"))
        if not templated:  # literal texts: only their doubled braces to undo
            return [{**m, "content": render_template(m["content"], None)} if isinstance(m.get("content"), str)
                    else dict(m) for m in value]
        return messages_factory(value)

    def check_field(self, field: str, path: Path) -> None:
        if not WORD.fullmatch(field) or field.startswith("_"):
            self.problem(f"{{{field}}}: a template names a public blackboard field (a word, no leading _); "
                         "write {{ and }} for literal braces", path)
            return
        properties = (self.schema or {}).get("properties")
        if isinstance(properties, dict) and field not in properties:
            self.problem(f"{{{field}}} is not a field of the blackboard schema (fields: "
                         f"{', '.join(sorted(properties)) or 'none'})", path)
        kind = self.blackboard_type
        fields = getattr(kind, "__dataclass_fields__", None) or getattr(kind, "model_fields", None)
        if fields is not None and field not in fields:
            self.problem(f"{{{field}}} is not a field of {kind.__name__}", path)  # type: ignore[union-attr]

    def payload_schema(self, value: Any, path: Path) -> Any:
        """A JSON Schema (self-contained) or a registered pydantic model's name."""
        if value is None:
            return None
        if isinstance(value, str):
            found = self.lookup("type", value, path, "register_type")
            if isinstance(found, type) and not hasattr(found, "model_validate"):
                self.problem(f"{value!r} is registered but is not a pydantic model", path)
            return found
        if isinstance(value, dict):
            try:
                check_schema(value)
            except SchemaProblem as exc:
                self.problem(f"schema is not a valid JSON Schema: {exc}", path + exc.path)
            return value
        self.problem("schema is a JSON Schema (a mapping), a registered pydantic model's name, or null", path)
        return None

    def expiration(self, value: Any, path: Path) -> Any:
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            return value
        if isinstance(value, list) and len(value) == 2:
            return tuple(value)
        self.problem(f"expiration is seconds, [min, max] seconds or null, got {value!r}", path)
        return None


_DEFAULT = object()


def build_plain_tree(tree_class: Any, doc: Document, variables: dict[str, Any], name: str | None = None) -> Any:
    """Build (and register) the tree a tree document describes; SpecError lists every problem with its place.
    `name` overrides the document's (the fleet builds stored specs under a name that includes their hash)."""
    original = copy.deepcopy(doc.data)
    builder = check_document(doc, variables, LocalNames(), build=True)
    root = builder.root
    if builder.problems:
        raise SpecError(builder.problems, doc.source)
    data = doc.data
    tree = tree_class[builder.blackboard_type](name or data["name"]) if builder.blackboard_type else \
        tree_class(name or data["name"])
    try:
        tree.attach(root)
        tree.End()
    except TasktreeError as exc:
        raise SpecError([doc.problem(str(exc), ("root",))], doc.source) from None
    tree.spec, tree.spec_variables = original, dict(variables)
    tree.spec_hash = spec_hash({"document": original, "variables": variables})
    tree.blackboard_schema = builder.schema
    return tree


def check_document(doc: Document, variables: dict[str, Any], names: Names, build: bool = False) -> Builder:
    """Every problem of a tree document (the builder's `root` is the built root node when `build` and none)."""
    builder = Builder(doc, names, build)
    data = doc.data
    if not builder.header(data, TREE_KEYS, "tree"):
        return builder
    if data.get("kind", "tree") != "tree":
        builder.problem(f"kind must be `tree` or `agent`, got {data.get('kind')!r}", ("kind",))
    defaults = data.get("vars") or {}
    if not isinstance(defaults, dict):
        builder.problem("vars maps names to default values", ("vars",))
        defaults = {}
    builder.problems.extend(substitute(doc, {**defaults, **variables}))
    data = doc.data
    if "root" not in data:
        builder.problem("a tree spec needs a `root` node", ())
        return builder
    builder.root = builder.node(data["root"], ("root",))
    return builder


def check_tree(doc: Document, variables: dict[str, Any], names: Names, build: bool) -> list[Problem]:
    """Every problem of a tree document; with `build`, also those only building finds (End()'s checks)."""
    probe = copy.deepcopy(doc.data) if build else None
    builder = check_document(doc, variables, names, build=build)
    if build and not builder.problems:
        try:
            build_plain_tree(_ProbeTree, Document(probe, doc.positions, doc.source), variables)
        except SpecError as exc:
            return exc.problems
    return builder.problems


class _ProbeTree:
    """Stands in for Tree in `validate`: the checks End() runs, without registering anything."""

    def __class_getitem__(cls, item: Any) -> type[_ProbeTree]:
        return cls

    def __init__(self, name: str) -> None:
        self.name = name
        self.root: Any = None

    def attach(self, root: Any) -> None:
        self.root = root

    def End(self) -> None:  # noqa: N802 - the builder's name
        from ..nodes.structure import assign_addresses

        for node in assign_addresses(self.name, self.root).values():
            node.OnBuildEnd()
