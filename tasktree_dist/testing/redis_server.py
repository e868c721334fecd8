"""Start a private redis-server on a free port in a temporary directory (tests, demo, benchmarks).

A private server keeps runs isolated from whatever else uses the machine's Redis, and works on a fresh
machine where none is running. The process is stopped by its own PID, never by name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]!r} exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def stop_heartbeats_to(host: str, port: int) -> None:
    """This process's heartbeats to a server (or sentinel) about to stop for good stop first: none keeps beating,
    and warning, at a closed port (imports nothing: a process that never beat has nothing to stop)."""
    liveness = sys.modules.get("tasktree_dist.distributed.liveness")
    if liveness is not None:
        liveness.stop_heartbeats(f"{host}:{port}")


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a process we started, by its PID: terminate, then kill if it does not exit in time."""
    stop_processes([process], timeout)


def stop_processes(processes: list[subprocess.Popen | None], timeout: float = 10.0) -> None:
    """Stop processes we started, by PID, all at once: each is sent SIGTERM before any is waited for, so their
    shutdowns overlap; one that does not exit in time is killed."""
    running = [process for process in processes if process is not None and process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(client: Any, timeout: float, retry_on: tuple[type[BaseException], ...]) -> None:
    """PING `client` until it answers (retrying `retry_on` errors until `timeout`), then close it."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except retry_on:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    finally:
        client.close()


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None
    directory: str = ""
    #: Keep data on disk (AOF) so a restart (`stop(keep_data=True)` then `start()`) finds it again.
    appendonly: bool = False
    #: More redis-server options, e.g. ("--replicaof", "127.0.0.1", "6379") for a replica.
    options: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make setup` (it installs the OS package)")
        self.directory = self.directory or tempfile.mkdtemp(prefix="tasktree-redis-")
        args = [
            binary, "--port", str(self.port), "--bind", self.host, "--dir", self.directory, "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
            "--daemonize", "no", "--logfile", os.path.join(self.directory, "redis.log"), *self.options,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.host, self.port, process=self.process)
        self._wait_loaded()
        return self

    def _wait_loaded(self, timeout: float = 20.0) -> None:
        """Listening is not serving: after a restart Redis answers LOADING until its AOF is read back."""
        import redis

        wait_until_serving(redis.Redis(host=self.host, port=self.port, socket_timeout=1), timeout,
                           (redis.exceptions.BusyLoadingError,))

    def client(self) -> Any:
        """A synchronous redis-py client on this server."""
        import redis

        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)

    def stop(self, keep_data: bool = False) -> None:
        """Stop the server (by its PID); with `keep_data` its directory stays for a restart on the same port."""
        if not keep_data:  # gone for good
            stop_heartbeats_to(self.host, self.port)
        stop_process(self.process, timeout=5)
        self.process = None
        if self.directory and not keep_data:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
