"""The configuration page is generated: this MkDocs hook replaces the marker `<!-- settings-table -->` with a table
of every field of the settings model (environment variable, type, default, description), so the page can never
disagree with what the processes read. The model is imported through `broker_config`, which keeps re-exporting
it wherever it lives."""

from __future__ import annotations

import json
from typing import Any, Literal, get_args, get_origin

MARKER = "<!-- settings-table -->"


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(value) for value in get_args(annotation))
    text = getattr(annotation, "__name__", None) if not get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "none"
    if value == "":
        return '`""`'
    return f"`{json.dumps(value) if isinstance(value, dict | list) else value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _env_names(name: str, field: Any, prefix: str) -> str:
    """The variable(s) a field is read from: its alias or alias choices when it has them, else prefix + name."""
    alias = field.validation_alias
    if isinstance(alias, str):
        names = [alias]
    elif alias is not None and hasattr(alias, "choices"):
        names = [choice for choice in alias.choices if isinstance(choice, str)]
    else:
        names = [f"{prefix}{name}"]
    return ", ".join(f"`{env.upper()}`" for env in names)


def settings_rows() -> list[tuple[str, str, str, str]]:
    """(environment variable, type, default, description) for every field of the settings model, in its order."""
    from broker_config import TasktreeSettings

    prefix = TasktreeSettings.model_config.get("env_prefix", "")
    return [
        (_env_names(name, field, prefix), _type_name(field.annotation), _default(field), field.description or "")
        for name, field in TasktreeSettings.model_fields.items()
    ]


def settings_table() -> str:
    lines = ["| variable | type | default | description |", "| --- | --- | --- | --- |"]
    for env, type_name, default, description in settings_rows():
        lines.append(f"| {env} | `{_cell(type_name)}` | {_cell(default)} | {_cell(description)} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(MARKER, settings_table()) if MARKER in markdown else markdown
