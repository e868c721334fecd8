"""Who is alive: one heartbeat key per process (worker or coordinator), renewed by a thread of its own.

Units a process received and runs it coordinates are marked with its process id; when its heartbeat key expires
(TASKTREE_LEASE_TTL after the process died or lost Redis) the units are sent again and the runs taken over. A
thread renews it, not the event loop, so a loop busy with CPU work is never mistaken for a dead process.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from ..core.instruments import hooks as metrics
from ..core.log import logger
from ..core.redis_client import connect
from . import keys


def new_process_id(name: str | None = None) -> str:
    """name:pid:tag (name: the Celery worker's hostname, e.g. `w1@host`, else the host) — the tag tells a
    restarted process that reused a pid from the dead one, and two hosts with the same name and pid apart (cloned
    VMs, containers with a fixed hostname, each its pid 1): 48 random bits, where 24 gave one clash in ~8 for 2000
    processes of the same name and pid."""
    return f"{name or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Heartbeat:
    """Renews `tasktree:hb:<process>` every TTL / 3 from a daemon thread (plus the process's info for the fleet
    listing). `info` is called at each beat, so what the process serves may change while it runs."""

    def __init__(
        self,
        redis_url: str,
        ttl: float,
        process_id: str | None = None,
        info: Callable[[], dict[str, Any]] | None = None,
        name: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.ttl = ttl
        self.process_id = process_id or new_process_id(name)
        self.info = info or (lambda: {})
        self.last_ok = 0.0
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis: Any = None
        self._pid = os.getpid()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()

    def start(self) -> Heartbeat:
        if self.alive:
            return self
        self._pid = os.getpid()
        self._stop.clear()
        self._redis = connect(self.redis_url, asynchronous=False, socket_timeout=max(1.0, self.ttl / 3),
                              socket_connect_timeout=max(1.0, self.ttl / 3))
        self.beat()  # alive before the first unit or run is marked with our id
        self._thread = threading.Thread(target=self._run, name="tasktree-heartbeat", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> bool:
        ttl_ms = int(self.ttl * 1000)
        info = {"process": self.process_id, "host": socket.gethostname(), "pid": os.getpid(), **self.info(),
                "metrics": metrics.address()}
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(keys.heartbeat(self.process_id), "1", px=ttl_ms)
            pipe.set(keys.process_info(self.process_id), orjson.dumps(info), px=ttl_ms)
            pipe.zadd(keys.PROCESSES, {self.process_id: time.time()})
            pipe.zremrangebyscore(keys.PROCESSES, "-inf", time.time() - 3600)
            pipe.expire(keys.PROCESSES, 3600)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis away: try again next beat; others may judge us dead
            if not self._failing:  # once per outage, not every beat
                logger.warning("heartbeat of %s failed: %s: %s", self.process_id, type(exc).__name__, exc)
            self._failing = True
            return False
        if self._failing:
            logger.warning("heartbeat of %s renewed: Redis is back", self.process_id)
        self._failing = False
        self.last_ok = time.monotonic()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):  # a renewal period, not synchronisation
            self.beat()

    def stop(self) -> None:
        """Stop beating and remove the key (a clean exit: nobody waits a TTL to learn we are gone)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self._thread = None
        if self._redis is not None:
            try:
                self._redis.delete(keys.heartbeat(self.process_id), keys.process_info(self.process_id))
                self._redis.zrem(keys.PROCESSES, self.process_id)
            except Exception:  # noqa: BLE001 - the key expires by itself
                pass
            self._redis.close()
            self._redis = None


_heartbeats: dict[str, Heartbeat] = {}
_lock = threading.Lock()


def process_heartbeat(redis_url: str, ttl: float) -> Heartbeat:
    """This process's heartbeat for `redis_url` (one identity per process: a worker's coordinator uses its
    runtime's), started on first use and again after a fork."""
    with _lock:
        beat = _heartbeats.get(redis_url)
        if beat is None or beat._pid != os.getpid():
            beat = _heartbeats[redis_url] = Heartbeat(redis_url, ttl)
        if not beat.alive:
            beat.start()
        return beat


def stop_heartbeats(address: str) -> None:
    """Stop this process's heartbeats to the Redis at `address` (host:port), which is going away for good (a test's
    private server): no thread keeps beating at a closed port, warning at each attempt."""
    with _lock:
        gone = [url for url in _heartbeats if f"//{address}" in url or f"@{address}" in url or f",{address}" in url]
        beats = [_heartbeats.pop(url) for url in gone]
    for beat in beats:
        beat.stop()


def adopt_heartbeat(beat: Heartbeat) -> None:
    """Make `beat` this process's identity for its Redis (the worker runtime's, named after the worker)."""
    with _lock:
        _heartbeats[beat.redis_url] = beat


def registered_process_info(info: dict[str, Any]) -> dict[str, Any]:
    """Process info including the trees registered here and their fingerprints (checked at submit), and the spec
    palette (what specs may name here, with schemas: builder.spec_palette)."""
    from ..builder.spec_palette import SPEC_TREE_MARK, process_palette
    from ..core.registry import registered_trees

    trees = {name: tree.fingerprint for name, tree in registered_trees().items() if SPEC_TREE_MARK not in name}
    return {**info, "trees": trees, "palette": process_palette()}
