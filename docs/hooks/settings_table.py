"""The configuration page is generated: this MkDocs hook replaces the marker `<!-- settings-table -->` with a table
of every field of the settings model (environment variable, type, default, description), so the page can never
disagree with what the processes read. The model is imported through `broker_config`, which keeps re-exporting
it wherever it lives."""

from __future__ import annotations

import json
from typing import Any

MARKER = "<!-- settings-table -->"
OTHER_MARKER = "<!-- other-variables-table -->"

#: Variables the library reads outside the settings model today, with what they do. A name the model gains (the
#: settings are being gathered into it) drops out of this table by itself: the model's table lists it.
OTHER_VARIABLES = {
    "TASKTREE_LLM_TRANSPORT": ("direct", "How non-streaming LLM calls are sent: direct (orjson and a lean HTTP/1.1 "
                               "client) or openai (chat.completions.create)"),
    "TASKTREE_LLM_HTTP_CLIENT": ("lean", "The direct transport's HTTP client: lean (httptools) or aiohttp"),
    "TASKTREE_LLM_HTTP_BACKEND": ("aiohttp", "The HTTP stack under openai-python: aiohttp or httpx"),
    "TASKTREE_UVLOOP": ("1", "Event loops are uvloop's where installed; 0 keeps asyncio's"),
    "TASKTREE_GC_FREEZE": ("1", "Freeze the garbage collector's view of what was imported once the LLM transport "
                           "is loaded; 0 turns it off"),
    "DISABLE_TASKTREE_LOGGING": ("", "1 silences the library's logger (tinytasktree's variable)"),
}


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
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


def other_variables_table() -> str:
    """The variables of OTHER_VARIABLES that the settings model does not hold (yet)."""
    in_model = {env.strip("`") for row in settings_rows() for env in row[0].split(", ")}
    lines = ["| variable | default | description |", "| --- | --- | --- |"]
    for env, (default, description) in OTHER_VARIABLES.items():
        if env not in in_model:
            shown = default or '""'
            lines.append(f"| `{env}` | `{shown}` | {_cell(description)} |")
    return "\n".join(lines) if len(lines) > 2 else "None: the settings model above holds every variable."


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, settings_table())
    if OTHER_MARKER in markdown:
        markdown = markdown.replace(OTHER_MARKER, other_variables_table())
    return markdown
