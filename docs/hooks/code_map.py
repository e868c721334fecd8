"""The architecture page's code map is generated: this MkDocs hook replaces `<!-- code-map -->` with a table of
every package of tasktree_dist and its modules, each with the first sentence of its docstring, read from the
source (nothing is imported). Moving or adding a module updates the page by itself."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

MARKER = "<!-- code-map -->"
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasktree_dist", "worker", "broker_config")


def summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line ('' when it has none)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split())
    end = text.find(". ")
    return (text if end < 0 else text[: end + 1]).replace("|", "\\|")


def code_map_rows(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(package, module, summary) for every module, packages in path order, `__init__` standing for the package."""
    rows = []
    for top in PACKAGES:
        for init in sorted((root / top).rglob("__init__.py")):
            package = init.parent
            dotted = ".".join(package.relative_to(root).parts)
            rows.append((dotted, "", summary(init)))
            for module in sorted(package.glob("*.py")):
                if module.name != "__init__.py":
                    rows.append((dotted, module.stem, summary(module)))
    return rows


def code_map() -> str:
    lines = ["| package | module | what it holds |", "| --- | --- | --- |"]
    for package, module, text in code_map_rows():
        lines.append(f"| **`{package}`** | | {text} |" if not module else f"| | `{module}` | {text} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(MARKER, code_map()) if MARKER in markdown else markdown
