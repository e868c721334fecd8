"""LLM flow control with its state on a Redis Cluster (3 local masters; broker a plain private redis-server): two
workers share limits, concurrency slots and budgets as on a single Redis (test_flow_fleet.py's tests, collected
again here). Flow-control keys share one hash tag ({flow}): one master serves them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.redis_cluster import RedisCluster
from tests.fleet.test_flow_fleet import (  # noqa: F401 - fixtures and tests collected again here, on the cluster
    fake,
    fleet,
    flow_workers,
    test_a_budget_stops_new_calls_across_the_fleet_and_the_result_says_why,
    test_a_concurrency_limit_holds_across_the_fleet,
    test_two_workers_and_several_runs_stay_within_the_server_limits,
)
from tests.helpers import redis_db

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def flow_fleet(redis_url: str, redis_cluster: RedisCluster, fake: ThreadedFakeLLM  # noqa: F811
               ) -> Iterator[dict[str, Any]]:
    with flow_workers(redis_db(redis_url, 15), redis_cluster.url, fake) as workers:
        yield workers
