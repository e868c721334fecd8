"""Writes a run needs wait for a replica (distributed/replicas.py), on real redis-servers: a master alone gets no
WAIT; with a replica every run record change is on the replica when it returns; a replica that goes away is waited
for a short grace, then writes go on without it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as redis_sync

from tasktree_dist.core.redis_client import connect
from tasktree_dist.distributed import keys, replicas
from tasktree_dist.runs.model import RunState
from tasktree_dist.runs.store import RunStore
from tasktree_dist.testing.redis_server import RedisServer
from tasktree_dist.testing.sentinels import FAST_SYNC

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def master() -> Iterator[RedisServer]:
    with RedisServer(options=FAST_SYNC) as server:
        yield server


def _waits(server: RedisServer) -> int:
    with redis_sync.Redis(port=server.port) as client:
        return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def _start_replica(master: RedisServer) -> RedisServer:
    replica = RedisServer(options=(*FAST_SYNC, "--replicaof", "127.0.0.1", str(master.port))).start()
    deadline = time.monotonic() + 30
    with redis_sync.Redis(port=master.port) as client:
        while client.info("replication").get("slave0", {}).get("state") != "online":
            assert time.monotonic() < deadline, "the replica never came in sync"
            time.sleep(0.05)  # polling with a deadline
    return replica


@pytest.fixture
async def store(master: RedisServer) -> AsyncIterator[RunStore]:
    client = connect(f"{master.url}/0", asynchronous=True, max_connections=8)
    try:
        yield RunStore(client, 600, 1000, replicas=replicas.Replicas(client, wanted=1, timeout_ms=100))
    finally:
        await client.aclose()


async def test_a_master_without_replicas_gets_no_wait(master: RedisServer, store: RunStore) -> None:
    assert await store.create("solo", RunState.QUEUED, {"tree": "t"})
    assert await store.replicas.count() == 0 and _waits(master) == 0


async def test_with_a_replica_each_record_change_is_on_it_when_it_returns(master: RedisServer,
                                                                          store: RunStore) -> None:
    replica = _start_replica(master)
    try:
        with redis_sync.Redis(port=replica.port) as on_replica:
            for index in range(20):
                assert await store.create(f"r{index}", RunState.QUEUED, {"tree": "t"})
                assert on_replica.hget(keys.run(f"r{index}"), "state") == b"queued"  # no polling: WAIT said so
            outcome = await store.transition("r0", [RunState.QUEUED], RunState.RUNNING)
            assert outcome.ok and on_replica.hget(keys.run("r0"), "state") == b"running"
        assert _waits(master) >= 21  # a WAIT per change (more when one came back short and a probe asked again)
    finally:
        replica.stop()


async def test_a_replica_gone_is_waited_for_a_grace_then_writes_go_on(
    master: RedisServer, store: RunStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(replicas, "GRACE_S", 0.5)
    replica = _start_replica(master)
    assert await store.create("before", RunState.QUEUED, {"tree": "t"})
    replica.stop()
    assert await store.create("after", RunState.QUEUED, {"tree": "t"})  # short WAITs, then on without it
    assert "not acknowledged by 1 replica" in caplog.text and "writes no longer wait" in caplog.text
    waits = _waits(master)
    assert await store.create("later", RunState.QUEUED, {"tree": "t"})
    assert _waits(master) == waits and await store.replicas.count() == 0
