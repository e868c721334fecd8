"""Start a private 3-master Redis Cluster on free ports in a temporary directory (tests, benchmarks).

Three `redis-server --cluster-enabled yes` processes, the 16384 slots split between them (CLUSTER ADDSLOTSRANGE),
joined with CLUSTER MEET; ready once every node reports `cluster_state:ok`. Each process is stopped by its own
PID, never by name.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from .redis_server import RedisServer, free_port

SLOTS = 16384


@dataclass
class ClusterNodeServer(RedisServer):
    """One master of the cluster: a RedisServer started with cluster mode on."""

    bus_port: int = 0

    def start(self) -> ClusterNodeServer:
        # the bus port on a free port of its own (by default port + 10000, which may be taken or past 65535)
        self.bus_port = free_port()
        self.options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "5000", "--cluster-port", str(self.bus_port))
        return super().start()  # type: ignore[return-value]


@dataclass
class RedisCluster:
    masters: int = 3
    nodes: list[ClusterNodeServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The state URL (TASKTREE_REDIS_URL) naming every node as a seed."""
        return "redis+cluster://" + ",".join(f"{node.host}:{node.port}" for node in self.nodes) + "/"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run `make setup` (it installs the OS package)")
        try:
            self.nodes = [ClusterNodeServer().start() for _ in range(self.masters)]
            clients = [node.client() for node in self.nodes]
            share = SLOTS // self.masters
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", self.nodes[0].host, self.nodes[0].port,
                                       self.nodes[0].bus_port)
            self._wait_ok(clients, timeout)
            for client in clients:
                client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, clients: list[Any], timeout: float) -> None:
        """Poll (with a deadline) until every node knows every other and serves all slots."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [client.execute_command("CLUSTER", "INFO") for client in clients]
            texts = [info.decode() if isinstance(info, bytes) else str(info) for info in infos]
            if all("cluster_state:ok" in text and f"cluster_known_nodes:{self.masters}" in text for text in texts):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster not ready after {timeout}s: {texts[0][:200]}")
            time.sleep(0.05)  # a polling period, bounded by the deadline above

    def clients(self) -> list[Any]:
        """A plain (non-cluster) client per master, to count keys and commands on each."""
        return [node.client() for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
