"""pytest plugin: `import tinytasktree` gives `tasktree_dist`.

Load it with `pytest -p tasktree_dist.testing.tinytasktree_alias`: plugins named with `-p` are imported before
any conftest, so a test suite written for tinytasktree (its own suite above all, see `make conformance`) runs
unchanged against this package. The alias wins over an installed tinytasktree: `sys.modules` is consulted first.
"""

from __future__ import annotations

import sys

import tasktree_dist

ALIAS = "tinytasktree"

sys.modules[ALIAS] = tasktree_dist


def pytest_report_header() -> str:
    return f"{ALIAS} -> tasktree_dist {tasktree_dist.__version__} ({tasktree_dist.__file__})"
