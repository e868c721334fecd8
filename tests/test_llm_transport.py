"""How LLM calls are sent: openai is imported lazily."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_does_not_import_openai() -> None:
    """openai is most of the import time: it loads on the first LLM call (or at a worker's start), not before."""
    code = "import sys, tasktree_dist; print(sorted(m for m in ('openai', 'httpx2', 'aiohttp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
