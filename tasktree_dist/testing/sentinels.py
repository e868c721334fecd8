"""A private Redis Sentinel deployment (tests, benchmarks): a master, replicas and sentinels, real `redis-server`
processes on free ports of 127.0.0.1, each in its own temporary directory, stopped by their own PIDs.

Sentinels here notice a dead master after `down_after_ms` (1 s, not 30) so a test's failover takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from .redis_server import RedisServer, free_port, stop_heartbeats_to, stop_process, wait_for_port


def sentinel_missing() -> str:
    """Why this machine cannot run sentinels ("" when it can): for a test's skip reason."""
    binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server is not installed"
    probe = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10)
    return "" if "--sentinel" in probe.stdout + probe.stderr else f"{binary} has no sentinel mode (--sentinel)"


#: A replica's first sync starts at once (the default waits 5 s for more replicas to share it).
FAST_SYNC = ("--repl-diskless-sync-delay", "0")


@dataclass
class SentinelProcess:
    master_port: int
    master: str
    down_after_ms: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    directory: str = ""

    def start(self) -> SentinelProcess:
        self.directory = tempfile.mkdtemp(prefix="tasktree-sentinel-")
        config = os.path.join(self.directory, "sentinel.conf")  # sentinels rewrite their file: it must be theirs
        with open(config, "w") as out:
            out.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"logfile {os.path.join(self.directory, 'sentinel.log')}\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} {max(3 * self.down_after_ms, 3000)}\n"
                f"sentinel parallel-syncs {self.master} 1\n"
            )
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen([binary, config, "--sentinel"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, process=self.process)
        return self

    def log(self) -> str:
        path = os.path.join(self.directory, "sentinel.log")
        return open(path).read()[-3000:] if os.path.exists(path) else ""

    def stop(self) -> None:
        stop_heartbeats_to("127.0.0.1", self.port)
        stop_process(self.process, timeout=5)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class SentinelDeployment:
    """`replicas` replicas of one master, watched by `sentinels` sentinels (quorum 2)."""

    master: str = "tasktree"
    replicas: int = 1
    sentinels: int = 3
    down_after_ms: int = 1000
    servers: list[RedisServer] = field(default_factory=list)
    watchers: list[SentinelProcess] = field(default_factory=list)

    def url(self, db: int = 0, scheme: str = "redis+sentinel") -> str:
        hosts = ",".join(f"127.0.0.1:{watcher.port}" for watcher in self.watchers)
        return f"{scheme}://{hosts}/{self.master}/{db}"

    def start(self, timeout: float = 30.0) -> SentinelDeployment:
        try:
            first = RedisServer(options=FAST_SYNC).start()
            self.servers.append(first)
            for _ in range(self.replicas):
                replica = RedisServer(options=(*FAST_SYNC, "--replicaof", "127.0.0.1", str(first.port)))
                self.servers.append(replica.start())
            for _ in range(self.sentinels):
                self.watchers.append(SentinelProcess(first.port, self.master, self.down_after_ms).start())
            self.wait_settled(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel_client(self, index: int = 0) -> Any:
        import redis

        return redis.Redis(port=self.watchers[index].port, socket_timeout=2, decode_responses=True)

    def master_port(self) -> int:
        """The master's port as the first sentinel tells it."""
        with self.sentinel_client() as client:
            return int(client.sentinel_get_master_addr_by_name(self.master)[1])

    def server(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def wait_settled(self, timeout: float = 30.0, master_port: int | None = None) -> None:
        """Until every sentinel names the same master (`master_port` when given), sees the other sentinels and
        the replicas that are up, and that master has them connected and in sync: a failover can then start."""
        import redis

        live = [server for server in self.servers if server.process is not None]
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                last = self._unsettled(len(live) - 1, master_port)
            except (redis.RedisError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if not last:
                return
            time.sleep(0.1)  # polling with a deadline: sentinels gossip every second or two
        logs = "\n".join(f"--- sentinel {w.port}\n{w.log()}" for w in self.watchers)
        raise TimeoutError(f"the sentinel deployment did not settle in {timeout}s: {last}\n{logs}")

    def _unsettled(self, replicas: int, master_port: int | None) -> str:
        import redis

        ports = set()
        for index, watcher in enumerate(self.watchers):
            with self.sentinel_client(index) as client:
                state = client.sentinel_master(self.master)
            ports.add(int(state["port"]))
            if "s_down" in state["flags"] or "o_down" in state["flags"] or "failover" in state["flags"]:
                return f"sentinel {watcher.port} sees the master as {state['flags']}"
            if state["num-other-sentinels"] < len(self.watchers) - 1 or state["num-slaves"] < replicas:
                return (f"sentinel {watcher.port} knows {state['num-other-sentinels']} other sentinels and "
                        f"{state['num-slaves']} replicas")
        if len(ports) != 1 or (master_port is not None and ports != {master_port}):
            return f"sentinels name masters on ports {sorted(ports)}"
        with redis.Redis(port=ports.pop(), socket_timeout=2, decode_responses=True) as master:
            info = master.info("replication")
        synced = [info[f"slave{i}"] for i in range(info["connected_slaves"])
                  if info[f"slave{i}"].get("state") == "online"]
        return "" if info["role"] == "master" and len(synced) >= replicas else f"master replication: {info}"

    def failover(self, timeout: float = 30.0, settle: bool = False) -> int:
        """`SENTINEL FAILOVER`: a replica becomes master; returns its port once the first sentinel names it (with
        `settle`: once every sentinel does and the old master, turned replica by the sentinels some seconds later,
        is in sync with it)."""
        old = self.master_port()
        with self.sentinel_client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.master)
        new = self._new_master(old, timeout)
        if settle:
            self.wait_settled(timeout, master_port=new)
        return new

    def kill_master(self, timeout: float = 30.0) -> int:
        """SIGKILL the master (by its PID): the sentinels notice after down_after_ms and promote a replica; returns
        its port once the first sentinel names it."""
        old = self.master_port()
        process = self.server(old).process
        assert process is not None
        process.kill()
        process.wait(10)
        return self._new_master(old, timeout)

    def _new_master(self, old: int, timeout: float) -> int:
        """Once every sentinel names one new master, up and not in a failover any more: its port."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for index in range(len(self.watchers)):
                with self.sentinel_client(index) as client:
                    states.append(client.sentinel_master(self.master))
            ports = {int(state["port"]) for state in states}
            if len(ports) == 1 and ports != {old} and all(state["flags"] == "master" for state in states):
                return ports.pop()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover from port {old} after {timeout}s: {states}")
            time.sleep(0.05)  # polling with a deadline

    def stop(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        for server in self.servers:
            server.stop()
        self.watchers.clear()
        self.servers.clear()

    def __enter__(self) -> SentinelDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
