"""tinytasktree's own test suite, run against tasktree_dist: the judge of drop-in compatibility.

    python -m tasktree_dist.testing.conformance <tinytasktree checkout> [-- extra pytest arguments]
    make conformance TINYTASKTREE_SRC=<tinytasktree checkout>

The checkout's `tests/` and `pytest.ini` are copied to a temporary directory, so its real tinytasktree package is
never importable, and run by this interpreter with the alias plugin (`import tinytasktree` gives tasktree_dist).
The last line sums it up, e.g. `tinytasktree conformance: 86/90 passed (test_utils.py: private helpers, not part
of the API)`. Exit status: 0 when every test outside the excluded files passes, 1 otherwise, 2 without a checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ALIAS_PLUGIN = "tasktree_dist.testing.tinytasktree_alias"
#: Test files of the suite that test what is not tinytasktree's API, and why.
EXCLUDED = {"test_utils.py": "private helpers, not part of the API"}


@dataclass
class Outcome:
    """What the suite did: every test id, and the ids that did not pass (failures, errors, skips)."""

    total: int = 0
    not_passed: list[str] = field(default_factory=list)
    #: Test modules that failed to import: each counts as one test, whatever it holds.
    uncollected: int = 0

    @property
    def passed(self) -> int:
        return self.total - len(self.not_passed)

    def unexpected(self) -> list[str]:
        """Tests that did not pass outside the excluded files."""
        return [test for test in self.not_passed if _file_of(test) not in EXCLUDED]

    def summary(self) -> str:
        excluded = "; ".join(f"{name}: {why}" for name, why in EXCLUDED.items())
        line = f"tinytasktree conformance: {self.passed}/{self.total} passed ({excluded})"
        return line + (f"; {self.uncollected} test module(s) failed to import" if self.uncollected else "")


def _file_of(test_id: str) -> str:
    return test_id.split("::", 1)[0].rsplit("/", 1)[-1]


def read_junit(path: Path) -> Outcome:
    """Tests and outcomes from pytest's JUnit XML, xunit1 flavour (it names each test's file); a module that fails
    to import counts as one failed test."""
    outcome = Outcome()
    for case in ET.parse(path).getroot().iter("testcase"):
        collected = bool(case.get("classname"))  # a module that failed to import has none
        test_id = case.get("file", "?") + (f"::{case.get('name')}" if collected else "")
        outcome.total += 1
        outcome.uncollected += not collected
        if any(case.find(tag) is not None for tag in ("failure", "error", "skipped")):
            outcome.not_passed.append(test_id)
    return outcome


def copy_suite(source: Path, destination: Path) -> None:
    """The suite only (tests/ and pytest.ini), without the package it was written next to."""
    shutil.copytree(source / "tests", destination / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    ini = source / "pytest.ini"
    if ini.is_file():
        shutil.copy2(ini, destination / "pytest.ini")


def run_suite(source: Path, pytest_args: Sequence[str] = ()) -> Outcome:
    """Run the copied suite in a child interpreter (this one) with the alias plugin; its output goes to ours."""
    with tempfile.TemporaryDirectory(prefix="tinytasktree-conformance-") as tmp:
        workdir = Path(tmp)
        copy_suite(source, workdir)
        report = workdir / "junit.xml"
        command = [
            sys.executable, "-m", "pytest", "-p", ALIAS_PLUGIN, "-p", "no:cacheprovider",
            "--continue-on-collection-errors", "-q", "--tb=short",
            f"--junitxml={report}", "-o", "junit_family=xunit1", *pytest_args, "tests",
        ]
        subprocess.run(command, cwd=workdir, check=False)
        if not report.is_file():
            raise RuntimeError("pytest wrote no report: see its output above")
        return read_junit(report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasktree_dist.testing.conformance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default=os.environ.get("TINYTASKTREE_SRC", ""),
                        help="a tinytasktree checkout (with tests/); default $TINYTASKTREE_SRC")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args(argv)
    source = Path(args.source) if args.source else None
    if source is None or not (source / "tests").is_dir():
        where = f"{source} has no tests/ directory" if source else "no checkout given"
        print(f"tinytasktree conformance: {where}; use `make conformance TINYTASKTREE_SRC=<tinytasktree checkout>`",
              file=sys.stderr)
        return 2
    outcome = run_suite(source, args.pytest_args)
    print(outcome.summary())
    unexpected = outcome.unexpected()
    for test in unexpected:
        print(f"  not passed: {test}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
