"""The text of specs: `$name` variables filled in a document, and `{field}` templates (messages) read from the
blackboard at each call."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from ..core.blackboard import read_field
from .spec_source import Document, Problem

VAR = re.compile(r"\$(\$|\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
WORD = re.compile(r"[A-Za-z_]\w*")
Path = tuple[Any, ...]


def substitute(
    document: Document, variables: dict[str, Any], skip: Callable[[Path], bool] = lambda path: False
) -> list[Problem]:
    """Replace `$name` / `${name}` in every string of the document (`$$` is a `$`); a whole-string `$name` takes
    the variable's JSON value. Values whose path `skip` accepts are left for run time (an agent's prompt)."""
    problems: list[Problem] = []

    def fill(text: str, path: Path) -> Any:
        whole = VAR.fullmatch(text)
        if whole and whole.group(1) != "$":
            name = whole.group(2) or whole.group(3)
            if name in variables:
                return variables[name]

        def one(match: re.Match[str]) -> str:
            if match.group(1) == "$":
                return "$"
            name = match.group(2) or match.group(3)
            if name not in variables:
                problems.append(document.problem(f"${name} has no value (give it with --var {name}=... or in "
                                                  "the document's `vars:`)", path))
                return match.group(0)
            return str(variables[name])

        return VAR.sub(one, text) if "$" in text else text

    def walk(value: Any, path: Path) -> Any:
        if isinstance(value, str):
            return fill(value, path)
        if isinstance(value, dict):
            return {k: (v if skip(path + (k,)) else walk(v, path + (k,))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        return value

    document.data = walk(document.data, ())
    return problems


def template_fields(text: str) -> list[str]:
    """The blackboard fields a `{field}` template reads (`{{` and `}}` are literal braces)."""
    return [m.group(1) for m in FIELD.finditer(text) if m.group(1) is not None]


def render_template(text: str, blackboard: Any) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        value = read_field(blackboard, match.group(1))
        return value if isinstance(value, str) else str(value)

    return FIELD.sub(one, text)


def messages_factory(messages: list[dict[str, Any]]) -> Callable[[Any], list[dict[str, Any]]]:
    """Messages whose texts are templates, rendered from the blackboard at each call."""
    def render(b: Any) -> list[dict[str, Any]]:
        return [{**m, "content": render_template(m["content"], b)} if isinstance(m.get("content"), str) else dict(m)
                for m in messages]

    render.__name__ = "messages"
    render.spec_messages = copy.deepcopy(messages)  # type: ignore[attr-defined] - read back by to_spec
    return render
