"""The API reference stays complete: this MkDocs hook replaces `<!-- reference-rest -->` with a `:::` block for
each name of `tasktree_dist.__all__` that the page does not document yet (a name added to the public API shows
up in the reference without anyone editing the page). mkdocstrings reads the source, so a name the package binds
only at run time (loaded on first use, or a live alias) is documented where it is defined."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

MARKER = "<!-- reference-rest -->"
#: A `:::` line naming the object, or a hand-written `### NAME` section for a value mkdocstrings cannot show.
DOCUMENTED = re.compile(r"^(?:::: tasktree_dist(?:\.\w+)*\.|### )(\w+)\s*$", re.MULTILINE)


def missing_names(markdown: str) -> list[str]:
    """Public names the page does not document yet, in `__all__` order."""
    import tasktree_dist

    documented = set(DOCUMENTED.findall(markdown))
    return [name for name in tasktree_dist.__all__ if name not in documented]


def statically_bound() -> set[str]:
    """Names `tasktree_dist/__init__.py` binds in its source (imports and assignments): what mkdocstrings sees."""
    import tasktree_dist

    tree = ast.parse(Path(tasktree_dist.__file__).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def reference_block(name: str, bound: set[str]) -> str:
    """`::: tasktree_dist.<name>`, or the defining module's path for a name bound at run time."""
    import tasktree_dist

    if name in bound:
        return f"::: tasktree_dist.{name}"
    value = getattr(tasktree_dist, name)
    module = getattr(value, "__module__", None)
    if module and getattr(value, "__name__", None) == name:
        return f"::: {module}.{name}"
    return f"### {name}\n\n`tasktree_dist.{name}`: {type(value).__name__}, bound when the package is imported."


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    bound = statically_bound()
    blocks = "\n\n".join(reference_block(name, bound) for name in missing_names(markdown))
    return markdown.replace(MARKER, blocks or "None: every public name is above.")
