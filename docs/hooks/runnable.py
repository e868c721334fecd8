"""Runnable examples: a fenced block whose info string is `python runnable` (optionally `title="name.py"`) runs
stand-alone, and tests/fleet/test_docs.py runs every one. Python-Markdown's SuperFences drops a fence whose info
string carries a bare word it does not know, so this MkDocs hook takes the word out before the page renders; the
same pattern finds the blocks for the tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: An opening fence with `runnable` among its words, its body, and the closing fence of the same length.
FENCE = re.compile(
    r"^(?P<fence>```+)(?P<lang>python)(?P<before>[^\n`]*?)\s+runnable\b(?P<after>[^\n`]*)\n"
    r"(?P<body>.*?)^(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
TITLE = re.compile(r'title="(?P<title>[^"]+)"')


@dataclass(frozen=True)
class RunnableBlock:
    """One example: where it is (file and line, for the failure message), the file name to run it as, its code."""

    source: str
    line: int
    filename: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def runnable_blocks(text: str, source: str) -> list[RunnableBlock]:
    """Every runnable example of a Markdown text, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        title = TITLE.search(match["before"] + match["after"])
        line = text.count("\n", 0, match.start()) + 1
        filename = title["title"] if title else f"example_{line}.py"
        blocks.append(RunnableBlock(source, line, filename, match["body"]))
    return blocks


def strip_runnable(markdown: str) -> str:
    """The same text with `runnable` taken out of the info strings, so SuperFences renders the fence."""
    return FENCE.sub(lambda m: f"{m['fence']}{m['lang']}{m['before']}{m['after']}\n{m['body']}{m['fence']}", markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return strip_runnable(markdown)


def markdown_sources(root: Path) -> list[Path]:
    """README.md and every page under docs/: the files whose runnable examples must run."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]
