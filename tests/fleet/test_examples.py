"""The runnable examples stay runnable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_local_demo_prints_result_and_trace_id(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "local_demo.py")], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "result: OK(48)" in out.stdout
    trace_id = next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("trace id:"))
    assert (tmp_path / ".traces" / f"{trace_id}.json").is_file()


def test_runs_demo_submits_watches_cancels_retries_and_lists() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "runs_demo.py"), "--docs", "12"], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "succeeded: 12 rows" in out.stdout and "cancel: True" in out.stdout
    assert "retried: succeeded (OK), attempt 1" in out.stdout and "succeeded: 2" in out.stdout
