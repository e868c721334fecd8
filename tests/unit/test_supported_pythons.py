"""The supported Pythons are said once per file and agree: pyproject's classifiers and requires-python, ruff's
target, the Makefile's PYTHONS (the virtual environments `make test-all-pythons` makes and CI runs), and CI runs
the command the README names."""

from __future__ import annotations

import re
import tomllib

from tasktree_dist.testing.fleet import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def makefile_variable(name: str) -> str:
    """The value of a simple `NAME := value` line of the Makefile."""
    text = (REPO_ROOT / "Makefile").read_text()
    found = re.search(rf"^{name}\s*:?=\s*(.*)$", text, re.MULTILINE)
    assert found is not None, f"Makefile sets no {name}"
    return found.group(1).strip()


def classified_pythons() -> list[str]:
    pattern = re.compile(r"Programming Language :: Python :: (3\.\d+)")
    return [found.group(1) for c in PYPROJECT["project"]["classifiers"] if (found := pattern.fullmatch(c))]


def test_the_makefile_tests_every_python_pyproject_declares() -> None:
    declared = classified_pythons()
    assert declared and makefile_variable("PYTHONS").split() == declared
    assert PYPROJECT["project"]["requires-python"] == f">={declared[0]}"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + declared[0].replace(".", "")
    assert makefile_variable("NATIVE_PYTHON") in declared  # tinytasktree's own: CI's second whole run


def test_ci_runs_the_command_the_readme_names() -> None:
    script = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in script if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    named = re.findall(r"^(make [\w-]+)\s+# what CI runs", (REPO_ROOT / "README.md").read_text(), re.MULTILINE)
    assert commands == named == ["make test-ci"]
