"""The API reference stays complete: this MkDocs hook replaces `<!-- reference-rest -->` with a `:::` block for
each name of `tasktree_dist.__all__` that the page does not document yet (a name added to the public API shows
up in the reference without anyone editing the page)."""

from __future__ import annotations

import re
from typing import Any

MARKER = "<!-- reference-rest -->"
DOCUMENTED = re.compile(r"^::: tasktree_dist(?:\.\w+)*\.(\w+)\s*$", re.MULTILINE)


def missing_names(markdown: str) -> list[str]:
    """Public names with no `::: tasktree_dist....<name>` line on the page, in `__all__` order."""
    import tasktree_dist

    documented = set(DOCUMENTED.findall(markdown))
    return [name for name in tasktree_dist.__all__ if name not in documented]


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    rest = missing_names(markdown)
    blocks = "\n\n".join(f"::: tasktree_dist.{name}" for name in rest) or "None: every public name is above."
    return markdown.replace(MARKER, blocks)
