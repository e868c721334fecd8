"""Every runnable example of README.md and docs/ runs as copied (a subprocess in an empty directory), and the site
builds with `mkdocs build --strict`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_hooks import ROOT, runnable_examples

EXAMPLES = runnable_examples()


def clean_env() -> dict[str, str]:
    """The environment a reader has: none of the TASKTREE_* variables other tests set in this process."""
    return {key: value for key, value in os.environ.items() if not key.startswith("TASKTREE_")}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("example", EXAMPLES, ids=[example.where for example in EXAMPLES])
def test_runnable_example_runs_as_copied(example, tmp_path: Path) -> None:
    script = tmp_path / example.filename
    script.write_text(example.code)
    out = subprocess.run(
        [sys.executable, script.name], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, f"{example.where} exited {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert out.stdout.strip(), f"{example.where} printed nothing"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs missing: pip install -e '.[dev]'")
@pytest.mark.timeout(240)
def test_site_builds_strict(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env={**clean_env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
    assert "TASKTREE_BROKER_URL" in (tmp_path / "site" / "configuration" / "index.html").read_text()
