"""What a command line gives as text turned into what RunClient takes: modules to import, a blackboard decoded into
its tree's type, labels."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..core.registry import registered_trees


class InputError(ValueError):
    """A command-line value that cannot be used; the message names the option and what was wrong."""


def import_modules(names: list[str], explicit: bool) -> list[str]:
    """Import the modules that build the trees (from the current directory too, as `celery -A worker` does).
    A module named with --import must import; one from TASKTREE_IMPORTS that does not is only reported."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    problems = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import-time error is the user's to see, named
            problem = f"cannot import {name!r}: {type(exc).__name__}: {exc}"
            if explicit:
                raise InputError(f"--import: {problem}") from None
            problems.append(problem)
    return problems


def read_json(text: str, option: str) -> Any:
    """JSON given inline, as `@path` (a file) or `-` (standard input)."""
    source = "the command line"
    if text == "-":
        text, source = sys.stdin.read(), "standard input"
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            text, source = path.read_text(), str(path)
        except OSError as exc:
            raise InputError(f"{option}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{option}: not JSON (from {source}): {exc}") from None


def blackboard_for(tree: str, data: Any) -> tuple[Any, str | None]:
    """The blackboard to submit: `data` validated into the tree's blackboard type when the tree is registered here
    (`Tree[Batch]` -> a Batch), else `data` as it is, with a warning to show."""
    local = registered_trees().get(tree)
    if local is None:
        return data, (f"tree {tree!r} is not built here (pass --import MODULE or set TASKTREE_IMPORTS): the "
                      "blackboard is sent as plain JSON, not as the tree's blackboard type")
    kind = local.blackboard_type
    if kind is None or data is None:
        return data, None
    try:
        return TypeAdapter(kind).validate_python(data), None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(whole)'}: {error['msg']}" for error in exc.errors()[:10]
        )
        raise InputError(f"--blackboard does not fit {kind.__name__}, the blackboard of tree {tree!r}: {problems}") \
            from None


def parse_labels(items: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels


def parse_vars(items: tuple[str, ...]) -> dict[str, Any]:
    """`--var k=v`: the value as JSON when it parses (numbers, lists...), else as the string given."""
    import json

    found: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--var {item!r}: use NAME=VALUE")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found


def read_spec(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def is_spec_file(argument: str) -> bool:
    return argument.endswith((".yaml", ".yml", ".json")) and Path(argument).is_file()


def spec_document(path: str, text: str) -> dict[str, Any]:
    """A spec file's document (the fleet gets data, never the file); its syntax problems named as FILE:line:col."""
    from ..builder.spec_source import SpecError, parse

    try:
        document = parse(text, path).data
    except SpecError as exc:
        raise InputError("; ".join(f"{path}:{p}" for p in exc.problems)) from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: a spec is a mapping (tasktree, name, root...)")
    return document
