"""Per-node overhead of a local (in-process) run: tasktree_dist against tinytasktree 0.1.7.

Two shapes, built once outside the timed region; only `await tree(ctx)` is timed, on a fresh Context each run,
best of N (default 7) after warm-up runs (default 1), in milliseconds. Library logging is off on every side
(DISABLE_TASKTREE_LOGGING=1, plus Context(enable_python_logging=False) where the Context accepts it).

    python benchmarks/local_overhead.py                        # tasktree_dist, this interpreter
    python benchmarks/local_overhead.py --lib tinytasktree     # the same code against tinytasktree
    python benchmarks/local_overhead.py --compare              # side-by-side (tinytasktree in its own interpreter)

The API is identical, so one code path serves both libraries. tinytasktree needs Python 3.13+; `--compare` runs it
by subprocess with `--tinytasktree-python` (default: $TINYTASKTREE_PYTHON, else a known 3.13 interpreter).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PYENV_313 = "/root/.pyenv/versions/3.13.0/bin/python"
SCRATCH_313 = "/tmp/ttt313/bin/python"
LIBS = ("tasktree_dist", "tinytasktree")

SEQ_LEAVES = 1000
GATHER_TREES = 1000
GATHER_LIMIT = 100
SHAPES: dict[str, str] = {
    "sequence": f"Sequence of {SEQ_LEAVES} Function leaves",
    "gather": f"Gather {GATHER_TREES} x Sequence(2 Function), limit {GATHER_LIMIT}",
}


@dataclass
class Board:
    """The small blackboard every tree runs on."""

    name: str = "bench"
    value: int = 0


def import_lib(name: str) -> ModuleType:
    """Import the library with its logging switched off (the env var is read at import time)."""
    os.environ["DISABLE_TASKTREE_LOGGING"] = "1"
    try:
        return importlib.import_module(name)
    except ImportError:
        if name != "tasktree_dist":
            raise
        sys.path.insert(0, str(REPO_ROOT))  # running from a checkout without an installed package
        return importlib.import_module(name)


def lib_version(lib: ModuleType) -> str:
    try:
        from importlib.metadata import version

        return version(lib.__name__)
    except Exception:  # noqa: BLE001 - any failure to read the metadata falls back to __version__
        return str(getattr(lib, "__version__", "?"))


def context_kwargs(lib: ModuleType) -> dict[str, Any]:
    """Turn off per-node Python logging on the Context if this library's Context has the switch."""
    params = inspect.signature(lib.Context).parameters
    return {"enable_python_logging": False} if "enable_python_logging" in params else {}


def build_sequence(lib: ModuleType) -> tuple[Any, Any, Any]:
    """Shape 1: one Sequence of SEQ_LEAVES sync Function leaves; returns (tree, blackboard, expected data)."""
    tree = lib.Tree[Board]("BenchSequence").Sequence()
    for _ in range(SEQ_LEAVES):
        tree._().Function(lambda b: 1)
    return tree.End(), Board(), 1


def build_gather(lib: ModuleType) -> tuple[Any, Any, Any]:
    """Shape 2: a Gather of GATHER_TREES two-leaf trees, each on its own blackboard; returns (tree, bb, expected)."""
    trees = [
        lib.Tree[Board](f"BenchPair{i:04d}").Sequence()._().Function(lambda b: 1)._().Function(lambda b: 2).End()
        for i in range(GATHER_TREES)
    ]
    boards = [Board(value=i) for i in range(GATHER_TREES)]
    tree = lib.Tree[Board]("BenchGather").Gather(lambda b: (trees, boards), concurrency_limit=GATHER_LIMIT).End()
    return tree, Board(), [2] * GATHER_TREES


async def time_tree(
    lib: ModuleType, tree: Any, board: Any, expected: Any, ctx_kwargs: dict[str, Any], warmup: int, repeat: int
) -> float:
    """Best wall time in ms of `await tree(ctx)` over `repeat` runs, each on a fresh Context."""
    best = float("inf")
    for i in range(warmup + repeat):
        ctx = lib.Context(**ctx_kwargs)
        async with ctx.using_blackboard(board):
            gc.collect()
            start = time.perf_counter()
            result = await tree(ctx)
            elapsed = time.perf_counter() - start
        if not result.is_ok() or result.data != expected:
            raise RuntimeError(f"{lib.__name__}: {tree!r} returned {result!r}, expected OK({expected!r:.40})")
        if i >= warmup:
            best = min(best, elapsed)
    return best * 1000.0


async def run_all(lib: ModuleType, warmup: int, repeat: int) -> dict[str, float]:
    ctx_kwargs = context_kwargs(lib)
    built = {"sequence": build_sequence(lib), "gather": build_gather(lib)}
    return {shape: await time_tree(lib, *args, ctx_kwargs, warmup, repeat) for shape, args in built.items()}


def measure(lib_name: str, warmup: int, repeat: int) -> dict[str, Any]:
    """Run both shapes on `lib_name` in this interpreter; a JSON-able report."""
    lib = import_lib(lib_name)
    return {
        "lib": lib_name,
        "version": lib_version(lib),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "env_DISABLE_TASKTREE_LOGGING": os.environ.get("DISABLE_TASKTREE_LOGGING", ""),
        "logger_disabled": logging.getLogger(lib_name).disabled,
        "context_kwargs": context_kwargs(lib),
        "warmup": warmup,
        "repeat": repeat,
        "ms": asyncio.run(run_all(lib, warmup, repeat)),
    }


# -- --compare ---------------------------------------------------------------------------------------------------
def import_error(python: str, module: str, env: dict[str, str] | None = None) -> str:
    """Why `python` cannot import `module` (last line of the traceback), or "" when it can."""
    if not Path(python).exists():
        return "no such interpreter"
    probe = subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode == 0:
        return ""
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {probe.returncode}"


def can_import(python: str, module: str, env: dict[str, str] | None = None) -> bool:
    return not import_error(python, module, env)


def find_tinytasktree_python(explicit: str | None) -> tuple[str | None, str]:
    """The interpreter to run tinytasktree with, and a note on how it was chosen (or why none was)."""
    if explicit:
        ok = can_import(explicit, "tinytasktree")
        return (explicit, "from --tinytasktree-python") if ok else (None, f"{explicit} cannot import tinytasktree")
    from_env = os.environ.get("TINYTASKTREE_PYTHON")
    if from_env:
        ok = can_import(from_env, "tinytasktree")
        return (from_env, "from $TINYTASKTREE_PYTHON") if ok else (None, f"$TINYTASKTREE_PYTHON={from_env} fails")
    for candidate in (PYENV_313, SCRATCH_313):
        if can_import(candidate, "tinytasktree"):
            return candidate, "auto-detected"
    return None, f"no interpreter imports tinytasktree (tried {PYENV_313}, {SCRATCH_313})"


def run_child(python: str, lib: str, args: argparse.Namespace, pythonpath: str | None = None) -> dict[str, Any]:
    env = dict(os.environ, DISABLE_TASKTREE_LOGGING="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    cmd = [python, str(Path(__file__).resolve()), "--lib", lib, "--json"]
    cmd += ["--warmup", str(args.warmup), "--repeat", str(args.repeat)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    report: dict[str, Any] = json.loads(proc.stdout)
    if pythonpath:
        report["pythonpath"] = pythonpath
    return report


def run_ours_on_313(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """tasktree_dist on the 3.13 interpreter (repo root on PYTHONPATH), for a same-interpreter comparison."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    tried = []
    for python in (PYENV_313, SCRATCH_313):
        error = import_error(python, "tasktree_dist", env)
        if error:
            tried.append(f"{python}: cannot import tasktree_dist ({error})")
            continue
        try:
            return run_child(python, "tasktree_dist", args, pythonpath=str(REPO_ROOT)), "; ".join(tried)
        except Exception as exc:  # noqa: BLE001 - the next interpreter is tried, this one named
            tried.append(f"{python}: {exc}")
    return None, "; ".join(tried)


def describe(report: dict[str, Any], note: str = "") -> str:
    logging_off = f"DISABLE_TASKTREE_LOGGING={report['env_DISABLE_TASKTREE_LOGGING']}"
    logging_off += f", logger disabled={report['logger_disabled']}"
    ctx = ", ".join(f"{k}={v}" for k, v in report["context_kwargs"].items()) or "no logging switch"
    extra = f" PYTHONPATH={report['pythonpath']}" if report.get("pythonpath") else ""
    extra += f"  [{note}]" if note else ""
    return (
        f"  {report['lib']} {report['version']}: Python {report['python']} ({report['implementation']}) "
        f"on {report['platform']}\n"
        f"      {report['executable']}{extra}\n"
        f"      logging off: {logging_off}; Context({ctx})"
    )


def table(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    head_ours = f"tasktree_dist py{ours['python']} ms"
    head_theirs = f"tinytasktree py{theirs['python']} ms"
    width = max(len(label) for label in SHAPES.values())
    rows = [f"  {'shape':<{width}}  {head_ours:>24}  {head_theirs:>24}  {'ratio':>6}"]
    rows.append("  " + "-" * (len(rows[0]) - 2))
    for shape, label in SHAPES.items():
        a, b = ours["ms"][shape], theirs["ms"][shape]
        rows.append(f"  {label:<{width}}  {a:>24.2f}  {b:>24.2f}  {a / b:>6.2f}")
    return "\n".join(rows)


def compare(args: argparse.Namespace) -> int:
    ours = measure("tasktree_dist", args.warmup, args.repeat)
    ttt_python, how = find_tinytasktree_python(args.tinytasktree_python)
    theirs = None
    if ttt_python:
        try:
            theirs = run_child(ttt_python, "tinytasktree", args)
        except Exception as exc:  # noqa: BLE001 - reported in the output instead of a figure
            how = f"{ttt_python} failed: {exc}"
    ours313, note313 = run_ours_on_313(args) if theirs else (None, "")

    print(f"Local overhead, ms per `await tree(ctx)`: best of {args.repeat} after {args.warmup} warm-up run(s)")
    print("Library logging was OFF on every side (DISABLE_TASKTREE_LOGGING=1; enable_python_logging=False).")
    print(describe(ours))
    if theirs is None:
        print(f"  tinytasktree: not run ({how}); showing tasktree_dist only.\n")
        for shape, label in SHAPES.items():
            print(f"  {label}: {ours['ms'][shape]:.2f} ms")
        return 0
    print(describe(theirs, how))
    if ours313:
        print(describe(ours313, f"skipped {note313}" if note313 else ""))
    print("\nAcross interpreters (ours in this interpreter, tinytasktree in its own):")
    print(table(ours, theirs))
    if ours313:
        print("\nSame interpreter (both on Python " + theirs["python"] + "):")
        print(table(ours313, theirs))
    else:
        print(f"\nSame-interpreter run of tasktree_dist skipped: {note313}")
    print("\nratio = tasktree_dist ms / tinytasktree ms (below 1.00: tasktree_dist is faster).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", choices=LIBS, default="tasktree_dist", help="library to benchmark in this process")
    parser.add_argument("--json", action="store_true", help="print one JSON report (used by --compare)")
    parser.add_argument("--compare", action="store_true", help="tasktree_dist here vs tinytasktree by subprocess")
    parser.add_argument("--tinytasktree-python", default=None, help="interpreter with tinytasktree installed")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per shape (best is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per shape first")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args)
    report = measure(args.lib, args.warmup, args.repeat)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"Local overhead, ms per `await tree(ctx)`: best of {args.repeat} after {args.warmup} warm-up run(s)")
    print("Library logging was OFF (DISABLE_TASKTREE_LOGGING=1; enable_python_logging=False where supported).")
    print(describe(report))
    for shape, label in SHAPES.items():
        print(f"  {label}: {report['ms'][shape]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
