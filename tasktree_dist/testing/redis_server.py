"""Start a private redis-server on a free port in a temporary directory (tests, demo, benchmarks).

A private server keeps runs isolated from whatever else uses the machine's Redis, and works on a fresh
machine where none is running. The process is stopped by its own PID, never by name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field


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


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a process we started, by its PID: terminate, then kill if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None
    directory: str = ""

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make setup` (it installs the OS package)")
        self.directory = tempfile.mkdtemp(prefix="tasktree-redis-")
        args = [
            binary, "--port", str(self.port), "--bind", self.host, "--dir", self.directory, "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--logfile", os.path.join(self.directory, "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.host, self.port, process=self.process)
        return self

    def stop(self) -> None:
        stop_process(self.process, timeout=5)
        self.process = None
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
