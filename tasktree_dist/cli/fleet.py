"""The fleet as Redis knows it, for `tasktree workers` and `tasktree metrics`: live processes (their heartbeat
info), active runs by state, broker queue lengths. Each worker process counts its own work (tasktree_dist.metrics);
this exporter adds what no single process knows."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..core.redis_client import connect
from ..core.sentinel import SCHEMES as SENTINEL_SCHEMES
from ..core.settings import TasktreeSettings
from ..distributed import keys

#: Active runs looked at per scrape (the active set is small: queued and running runs only).
ACTIVE_SCAN = 10_000


class FleetReader:
    def __init__(self, settings: TasktreeSettings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url, asynchronous=False, socket_timeout=5, socket_connect_timeout=5)
        broker = settings.broker_url.split(";")[0]
        # a Redis broker (plain, or its master found through Sentinel) is read for queue lengths; AMQP is not
        self.broker = (connect(settings.with_tls(broker), asynchronous=False, socket_timeout=5,
                               socket_connect_timeout=5)
                       if urlsplit(broker).scheme in ("redis", "rediss", *SENTINEL_SCHEMES) else None)

    def processes(self) -> list[dict[str, Any]]:
        """Info of every process whose heartbeat is alive (an expired one has no info key any more)."""
        names = [n.decode() for n in self.redis.zrangebyscore(keys.PROCESSES, time.time() - 3600, "+inf")]
        infos = self.redis.mget([keys.process_info(n) for n in names]) if names else []
        return sorted((orjson.loads(raw) for raw in infos if raw), key=lambda info: str(info.get("process")))

    def scrape_targets(self) -> list[dict[str, Any]]:
        """Prometheus file_sd: one target group per live process that serves metrics."""
        return [{"targets": [info["metrics"]], "labels": {"job": "tasktree", "process": str(info.get("process")),
                                                          "role": str(info.get("role", "coordinator"))}}
                for info in self.processes() if info.get("metrics")]

    def active_runs(self) -> Counter[str]:
        ids = self.redis.zrange(keys.ACTIVE_RUNS, 0, ACTIVE_SCAN - 1)
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hget(keys.run(run_id.decode()), "state")
        return Counter(state.decode() for state in (pipe.execute() if ids else []) if state)

    def queue_lengths(self, processes: list[dict[str, Any]]) -> dict[str, int]:
        if self.broker is None:
            return {}
        names = {self.settings.queue, self.settings.runs_queue}
        names.update(q for info in processes for q in info.get("queues") or ())
        ordered = sorted(names)
        pipe = self.broker.pipeline(transaction=False)
        for name in ordered:
            pipe.llen(name)
        return dict(zip(ordered, pipe.execute(), strict=True))


class FleetCollector(Collector):
    """Read at each scrape (nothing cached, nothing counted twice)."""

    def __init__(self, reader: FleetReader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[GaugeMetricFamily]:
        processes = self.reader.processes()
        roles = Counter(str(info.get("role", "coordinator")) for info in processes)
        live = GaugeMetricFamily("tasktree_fleet_processes", "Live processes (heartbeat alive) by role",
                                 labels=["role"])
        for role, count in sorted(roles.items()):
            live.add_metric([role], count)
        yield live
        running = GaugeMetricFamily("tasktree_fleet_units_running", "Units running on live worker processes")
        running.add_metric([], sum(int(info.get("running") or 0) for info in processes))
        yield running
        waiting = GaugeMetricFamily("tasktree_fleet_units_waiting_for_slot",
                                    "Units on live workers waiting for a slot of their fan-out (its lookahead)")
        waiting.add_metric([], sum(int(info.get("waiting_for_slot") or 0) for info in processes))
        yield waiting
        runs = GaugeMetricFamily("tasktree_runs", "Active runs by state (queued, running)", labels=["state"])
        active = self.reader.active_runs()
        for state in ("queued", "running"):
            runs.add_metric([state], active.get(state, 0))
        yield runs
        queues = GaugeMetricFamily("tasktree_queue_length", "Messages waiting in a broker queue", labels=["queue"])
        for name, length in self.reader.queue_lengths(processes).items():
            queues.add_metric([name], length)
        yield queues


def serve_fleet_metrics(reader: FleetReader, host: str, port: int) -> None:
    """Serve the fleet collector (its own registry: no process metrics of this exporter) until interrupted."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(FleetCollector(reader))
    server, thread = start_http_server(port, addr=host, registry=registry)
    print(f"tasktree fleet metrics on http://{host}:{server.server_port}/metrics (Ctrl-C to stop)", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()
