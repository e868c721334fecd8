"""Waits with run state on a Redis Cluster (3 local masters; broker a plain private redis-server): parking,
signals, deadlines and a fleet restart while parked work as on a single Redis (test_waits.py's tests collected
again here). On a cluster the active and due sets are updated beside the wait scripts (runs.waits)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist.testing.redis_cluster import RedisCluster
from tests.fleet.test_waits import (  # noqa: F401 - fixtures and tests collected again here, on the cluster
    client,
    test_a_run_parks_releases_its_slot_and_resumes_on_its_signal,
    test_all_workers_restarted_while_parked_the_run_completes,
    test_an_early_signal_is_kept_until_its_wait_is_reached,
    test_every_key_a_parked_run_writes_has_a_ttl,
    test_timeouts_with_and_without_default,
)
from tests.helpers import two_workers

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def waits_fleet(redis_url: str, redis_cluster: RedisCluster) -> Iterator[dict[str, Any]]:
    """test_waits.py's fleet with its state on the cluster (broker: database 14 of the private server, flushed)."""
    with two_workers(redis_url, (14, 14), "tests.wait_trees", "waits", concurrency=16, flush=True,
                     state_url=redis_cluster.url, TASKTREE_LEASE_TTL="3") as fleet:
        yield fleet
