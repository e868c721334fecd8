"""The tinytasktree conformance tooling, without the external checkout: the alias plugin and the suite runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasktree_dist.testing.fleet import REPO_ROOT

PASSING = '''
import tinytasktree


async def test_runs_a_tree():
    tree = tinytasktree.Tree("T").Sequence()._().Function(lambda: 41)._().Function(lambda: 42).End()
    result = await tree(tinytasktree.Context())
    assert result.is_ok() and result.data == 42


def test_is_us():
    import tasktree_dist

    assert tinytasktree is tasktree_dist
'''


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "TINYTASKTREE_SRC"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def fake_checkout(root: Path) -> Path:
    """A tinytasktree checkout in miniature: its package (never to be imported), tests/, pytest.ini."""
    (root / "tinytasktree").mkdir(parents=True)
    (root / "tinytasktree" / "__init__.py").write_text("raise ImportError('the real tinytasktree was imported')\n")
    (root / "tests").mkdir()
    # like tinytasktree's conftest: puts the checkout on sys.path, then imports the package
    (root / "tests" / "conftest.py").write_text(
        "import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).resolve().parents[1]))\n"
        "import tinytasktree\n"
    )
    (root / "tests" / "test_basic.py").write_text(PASSING)
    (root / "tests" / "test_utils.py").write_text(
        "import tinytasktree\n\ndef test_private():\n    assert tinytasktree._as_int('1') == 1\n"
    )
    (root / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    return root


def test_alias_plugin_makes_import_tinytasktree_give_tasktree_dist(tmp_path: Path) -> None:
    """Loaded with -p, the alias is in place before a conftest imports tinytasktree, and wins over a real one."""
    source = fake_checkout(tmp_path / "src")
    plugin = "tasktree_dist.testing.tinytasktree_alias"
    done = run([sys.executable, "-m", "pytest", "-q", "-p", plugin, "-p", "no:cacheprovider", "tests/test_basic.py"],
               source)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout

    without = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_basic.py"], source)
    assert without.returncode != 0 and "the real tinytasktree was imported" in without.stdout + without.stderr


def test_conformance_runs_the_copied_suite_and_sums_it_up(tmp_path: Path) -> None:
    source = fake_checkout(tmp_path / "src")
    command = [sys.executable, "-m", "tasktree_dist.testing.conformance", str(source)]
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last == "tinytasktree conformance: 2/3 passed (test_utils.py: private helpers, not part of the API)"
    assert not (source / "junit.xml").exists() and not list(source.rglob("__pycache__"))  # ran on a copy

    (source / "tests" / "test_more.py").write_text("def test_fails():\n    assert False\n")
    done = run(command, tmp_path)
    assert done.returncode == 1
    assert "tinytasktree conformance: 2/4 passed" in done.stdout
    assert "not passed: tests/test_more.py::test_fails" in done.stdout


def test_conformance_needs_a_checkout(tmp_path: Path) -> None:
    done = run([sys.executable, "-m", "tasktree_dist.testing.conformance"], tmp_path)
    assert done.returncode == 2 and "TINYTASKTREE_SRC" in done.stderr
    done = run([sys.executable, "-m", "tasktree_dist.testing.conformance", str(tmp_path)], tmp_path)
    assert done.returncode == 2 and "has no tests/ directory" in done.stderr

    done = run(["make", "-s", "-o", "setup", "conformance"], REPO_ROOT)  # -o setup: the venv is there already
    assert done.returncode != 0 and "make conformance TINYTASKTREE_SRC=" in done.stderr


# tinytasktree 0.1.7's __all__: its public names, each one ours too.
TINYTASKTREE_ALL = (
    "AnyB", "Context", "JSON", "LLMModel", "LLMProvider", "Tool", "ToolCall", "LLMToolFactory", "LLMMessageCallback",
    "ToolFunction", "LLMRunRecord", "ToolResult", "JSONLoader", "Result", "Status", "TasktreeError",
    "TasktreeProgrammingError", "Tracer", "TraceLevel", "TraceNode", "TraceRoot", "TraceStorageHandler",
    "FileTraceStorageHandler", "create_http_app", "run_httpserver", "register_global_hook_after_spawned_task_finish",
    "Tree",
)


def test_tinytasktree_public_names_are_ours() -> None:
    import typing

    import tasktree_dist

    missing = [name for name in TINYTASKTREE_ALL if not hasattr(tasktree_dist, name)]
    assert not missing
    assert set(TINYTASKTREE_ALL) <= set(tasktree_dist.__all__)
    assert tasktree_dist.LLMNode is tasktree_dist.LLM  # the class tinytasktree's tests patch
    assert typing.get_args(tasktree_dist.TraceLevel) == ("info", "warning", "error")
    assert tasktree_dist.LLMToolFactory[int] is not None and tasktree_dist.LLMMessageCallback[int] is not None
