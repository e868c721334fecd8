"""The docs' MkDocs hooks (docs/hooks/*.py) as modules for the tests: the same code finds the runnable examples,
renders the settings table and completes the API reference for the site and for the checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_hook(name: str) -> ModuleType:
    """docs/hooks/<name>.py, imported by path (docs/ is not a package)."""
    module_name = f"docs_hook_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "docs" / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def runnable_examples() -> list:
    """Every ```python runnable block of README.md and docs/*.md (RunnableBlock: source, line, filename, code)."""
    runnable = load_hook("runnable")
    return [
        block
        for path in runnable.markdown_sources(ROOT)
        for block in runnable.runnable_blocks(path.read_text(), str(path.relative_to(ROOT)))
    ]
