"""A coordinator takeover on the TLS-only redis-server with the documented ACL users: the process coordinating an LLM
batch is killed and another takes the run over by replay (test_supervision's test, on this module's fleet)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist.testing.fleet import WorkerProcess, stop_workers, wait_until_ready
from tasktree_dist.testing.secure_redis import SecureRedisServer
from tests.fleet.test_supervision import (  # noqa: F401 - the test and its client fixture run on this module's fleet
    TTL,
    client,
    test_a_killed_coordinator_is_replaced_and_no_finished_llm_call_is_repeated,
)
from tests.secure_fleet import role_app, role_env, secure_redis

pytestmark = pytest.mark.timeout(150)

BROKER_DB, RUNS_DB = 2, 3
SETTINGS = {"lease_ttl": TTL, "batch_size": 1, "redis_outage_limit": 4.0}


@pytest.fixture(scope="module")
def server() -> Iterator[SecureRedisServer]:
    with secure_redis() as server:
        yield server


@pytest.fixture
def fleet(server: SecureRedisServer) -> Iterator[dict[str, Any]]:
    """Workers as tasktree-worker (spawned by the test), the test's app as tasktree-coordinator."""
    env = role_env(server, "worker", BROKER_DB, RUNS_DB, TASKTREE_LEASE_TTL=str(TTL), TASKTREE_BATCH_SIZE="1",
                   TASKTREE_REDIS_OUTAGE_LIMIT="4")
    app = role_app(server, "coordinator", BROKER_DB, RUNS_DB, **SETTINGS)
    pinger = role_app(server, "admin", BROKER_DB, RUNS_DB, **SETTINGS)
    started: list[WorkerProcess] = []

    def spawn_all(names: tuple[str, ...], queues: str = "tasktree,tasktree.runs",
                  concurrency: int = 32) -> dict[str, WorkerProcess]:
        workers = {name: WorkerProcess(name, env, queues=queues, concurrency=concurrency) for name in names}
        started.extend(worker.start() for worker in workers.values())
        wait_until_ready(pinger, list(workers.values()))
        return workers

    def spawn(name: str, **options: Any) -> WorkerProcess:
        return spawn_all((name,), **options)[name]

    try:
        yield {"app": app, "settings": app.tasktree_settings, "spawn": spawn, "spawn_all": spawn_all,
               "workers": started}
    finally:
        stop_workers(started)
        refused = [entry for entry in server.acl_log() if entry.get("username") != "tasktree-board"]
        assert not refused, f"the documented ACL rules refused the fleet: {refused[:5]}"
