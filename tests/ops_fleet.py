"""A private fleet for the operator tests (metrics, CLI, runs board): two real `celery -A worker worker` processes
serving units and coordinators, metrics on free ports, on Redis databases 14 (broker) and 15 (runs), flushed
first so each module starts clean. Stopped by PID."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasktree_dist.testing.fleet import REPO_ROOT
from tests.helpers import two_workers

BROKER_DB, RUNS_DB = 14, 15


@contextmanager
def ops_fleet(redis_url: str, name: str, imports: str = "tests.run_trees") -> Iterator[dict[str, Any]]:
    dbs = (BROKER_DB, RUNS_DB)
    with two_workers(redis_url, dbs, imports, name, flush=True, TASKTREE_METRICS_PORT="auto") as fleet:
        yield fleet


def tasktree_command() -> list[str]:
    """The `tasktree` console script next to this interpreter (the venv's), else the same entry point through it."""
    script = Path(sys.executable).with_name("tasktree")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from tasktree_dist.cli import main; main()"]


def tasktree(env: dict[str, str], *args: str, timeout: float = 60, stdin: str | None = None) -> (
    subprocess.CompletedProcess[str]
):
    """Run the `tasktree` command as an operator would, in the repository."""
    return subprocess.run([*tasktree_command(), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def wait_for(check: Any, what: str, within: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `check()` until truthy; fail naming `what` and the last value after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen after {within}s (last: {last!r})")
        time.sleep(interval)  # polling with a deadline


@contextmanager
def served(env: dict[str, str], trace_dir: Path, token: str | None = None) -> Iterator[str]:
    """`tasktree serve` (with `--control-token` when given) in its own process on a free loopback port; its URL.
    Stopped by PID; its log printed when it stops."""
    from tasktree_dist.testing.fleet import temp_log
    from tasktree_dist.testing.redis_server import free_port, stop_process, wait_for_port

    port = free_port()
    log = temp_log("serve")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*tasktree_command(), "serve", "--port", str(port), "--trace-dir", str(trace_dir),
             *(["--control-token", token] if token else [])],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 30, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)
        print(log.read_text(errors="replace")[-2000:])
