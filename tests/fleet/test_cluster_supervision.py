"""Supervision with run state on a Redis Cluster (3 local masters; broker a plain private redis-server): a killed
worker's units and a killed coordinator's run are taken over as on a single Redis (test_supervision.py's tests,
collected again here; the Redis restart tests need a single server and stay there)."""

from __future__ import annotations

import pytest

from tasktree_dist.testing.redis_cluster import RedisCluster
from tasktree_dist.testing.redis_server import RedisServer
from tests.fleet.test_supervision import (  # noqa: F401 - fixtures and tests collected again here, on the cluster
    client,
    fleet,
    server,
    supervision_env,
    test_a_killed_coordinator_is_replaced_and_no_finished_llm_call_is_repeated,
    test_a_killed_worker_with_prefetched_and_running_units_loses_nothing,
)

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def env(server: RedisServer, redis_cluster: RedisCluster) -> dict[str, str]:  # noqa: F811 - the cluster's
    return supervision_env(f"{server.url}/0", redis_cluster.url)
