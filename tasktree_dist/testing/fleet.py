"""Start and stop real `celery -A worker worker` processes (tests, demo, benchmarks), by PID only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .redis_server import free_port, stop_process, stop_processes, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def temp_log(kind: str) -> Path:
    """A fresh log file for a child process (kept after it exits, for the failure message)."""
    return Path(tempfile.mkstemp(prefix=f"tasktree-{kind}-", suffix=".log")[1])


def fleet_env(broker_url: str, redis_url: str, imports: str, **extra: str) -> dict[str, str]:
    """The environment a worker (and its coordinator) needs: the same variables the Makefile and compose use."""
    env = dict(os.environ)
    env.update(
        TASKTREE_BROKER_URL=broker_url,
        TASKTREE_REDIS_URL=redis_url,
        TASKTREE_IMPORTS=imports,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])),
    )
    env.update(extra)
    return env


def fleet_settings(env: dict[str, str], **overrides: Any) -> Any:
    """The coordinator's TasktreeSettings for a fleet started with `env`: the same broker and Redis."""
    from ..core.settings import TasktreeSettings

    return TasktreeSettings(broker_url=env["TASKTREE_BROKER_URL"], redis_url=env["TASKTREE_REDIS_URL"], **overrides)


@dataclass
class WorkerProcess:
    name: str
    env: dict[str, str]
    queues: str = "tasktree,tasktree.runs"
    concurrency: int = 32
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: temp_log("worker"))
    #: A command the worker runs under, exec'ing it (its pid stays the worker's): a namespace host's (netns.Host).
    prefix: tuple[str, ...] = ()

    @property
    def hostname(self) -> str:
        return self.name if "@" in self.name else f"{self.name}@%h"

    def start(self) -> WorkerProcess:
        args = [
            *self.prefix, sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO",
            "-n", self.hostname, "-Q", self.queues, "--concurrency", str(self.concurrency), "--without-gossip",
            "--without-mingle",
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it until it exits
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)  # SIGTERM: Celery's warm shutdown
        self.process = None


def stop_workers(workers: list[WorkerProcess]) -> None:
    """Stop `workers` by PID, their warm shutdowns overlapping (one at a time, each waits out its own)."""
    stop_processes([worker.process for worker in workers])
    for worker in workers:
        worker.process = None


def wait_until_ready(app: Any, workers: list[WorkerProcess], timeout: float = 30.0) -> list[str]:
    """Ping the workers until every one answers; fail with its log if one died or never answered.

    The ping is addressed to these workers only (a pattern on their names: a namespace host expands %h to its own
    hostname) and expects one reply each, so it returns as soon as they all answered rather than after its whole
    reply window; a worker still booting costs one window (0.5 s) per round."""
    deadline = time.monotonic() + timeout
    names: list[str] = []
    prefixes = [worker.name.split("@")[0] + "@" for worker in workers]
    pattern = "^(?:" + "|".join(re.escape(prefix) for prefix in prefixes) + ")"
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.process is not None and worker.process.poll() is not None:
                code = worker.process.returncode
                raise RuntimeError(f"worker {worker.name} exited with {code}:\n{worker.log()[-3000:]}")
        try:
            replies = app.control.ping(pattern=pattern, matcher="pcre", timeout=0.5, limit=len(workers)) or []
        except Exception:  # noqa: BLE001 - the broker restarting (tests do that): ask again
            replies = []
        names = [name for reply in replies for name in reply]
        if all(any(n.startswith(prefix) for n in names) for prefix in prefixes):
            return names
    logs = "\n".join(f"--- {w.name}\n{w.log()[-2000:]}" for w in workers)
    raise TimeoutError(f"workers not ready after {timeout}s (answered: {names})\n{logs}")


@contextmanager
def running_workers(app: Any, workers: list[WorkerProcess], timeout: float = 30.0) -> Iterator[list[str]]:
    """Start `workers`, wait until they answer (their node names), stop them by PID on the way out."""
    try:
        for worker in workers:
            worker.start()
        yield wait_until_ready(app, workers, timeout)
    finally:
        stop_workers(workers)


@dataclass
class FlowerProcess:
    """`celery -A worker flower` on 127.0.0.1:`port` for the fleet's env, stopped by its own PID.

    Flower 2.2 refuses its HTTP API without authentication unless FLOWER_UNAUTHENTICATED_API is set (which also
    opens it to cross-origin reads), so `basic_auth` ("user:password") is passed; send it with each API call.
    """

    env: dict[str, str]
    port: int
    basic_auth: str = ""
    address: str = "127.0.0.1"
    #: More `celery flower` options, e.g. ("--persistent=True", "--db=/path/flower.db") as compose passes them.
    options: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: temp_log("flower"))

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self) -> FlowerProcess:
        args = [
            sys.executable, "-m", "celery", "-A", "worker", "--broker", self.env["TASKTREE_BROKER_URL"], "flower",
            f"--address={self.address}", f"--port={self.port}", *self.options,
        ]
        if self.basic_auth:
            args.append(f"--basic-auth={self.basic_auth}")
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it until it exits
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Wait for the HTTP port; fail with Flower's log if it exited or never listened."""
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"flower exited with {code}:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"flower not listening on {self.url} after {timeout}s\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None


@dataclass
class FakeLLMProcess:
    """`python -m tasktree_dist.testing.fake_llm` in its own process (benchmarks, the demo), stopped by its PID:
    its CPU stays off the caller's event loop and shows separately in /proc."""

    latency_ms: float = 0.0
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=lambda: temp_log("fakellm"))
    #: Rate limits per fixed window of window_s, per model (None: none); see testing.fake_limits.
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    limit_models: tuple[str, ...] = ()  # only these models are limited (default: every model, each on its own)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> FakeLLMProcess:
        args = [
            sys.executable, "-m", "tasktree_dist.testing.fake_llm", "--port", str(self.port),
            "--latency-ms", str(self.latency_ms), "--window-s", str(self.window_s),
        ]
        for flag, value in (("--rpm", self.rpm), ("--tpm", self.tpm)):
            if value is not None:
                args += [flag, str(value)]
        for model in self.limit_models:
            args += ["--limit-model", model]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it until it exits
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_for_port("127.0.0.1", self.port, timeout, process=self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"fake LLM server did not start: {exc}\n{self.log()[-2000:]}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def __enter__(self) -> FakeLLMProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
