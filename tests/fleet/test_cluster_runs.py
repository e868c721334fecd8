"""Run state on a Redis Cluster (3 local masters; the broker a plain private redis-server): a representative
subset of test_runs.py passes unchanged against it, and the runs spread over all three masters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist import RunClient, Status
from tasktree_dist.distributed import keys
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.redis_cluster import RedisCluster
from tests import run_trees as R
from tests.fleet.test_runs import (  # noqa: F401 - fixtures and tests collected again here, on the cluster
    batch,
    client,
    llm,
    test_an_app_submits_and_exits_the_run_completes_in_the_fleet,
    test_an_inline_run_is_recorded_and_listed,
    test_cancel_from_another_process_stops_running_units_and_keeps_finished_work,
    test_events_are_live_and_replayable_and_runs_list_by_state,
    test_every_key_a_run_writes_has_a_ttl,
    test_retry_reruns_only_the_failed_units,
    test_submit_is_idempotent_by_run_id,
)
from tests.helpers import two_workers

pytestmark = pytest.mark.timeout(120)

RUNS = 30  # uuid run ids: all on fewer than three masters with probability 3 * (2/3)**30, about 2e-5


@pytest.fixture(scope="module")
def runs_fleet(redis_url: str, redis_cluster: RedisCluster) -> Iterator[dict[str, Any]]:
    """test_runs.py's fleet with its state on the cluster (broker: database 14 of the private server)."""
    with two_workers(redis_url, (14, 14), "tests.run_trees", "runs", concurrency=64, flush=True,
                     state_url=redis_cluster.url) as fleet:
        yield fleet


def per_master(cluster: RedisCluster, pattern: str) -> list[int]:
    counts = []
    for master in cluster.clients():
        counts.append(sum(1 for _ in master.scan_iter(match=pattern, count=1000)))
        master.close()
    return counts


async def test_runs_spread_over_every_master_and_each_keeps_its_keys_in_one_slot(
    client: RunClient, llm: ThreadedFakeLLM, redis_cluster: RedisCluster  # noqa: F811 - the imported fixtures
) -> None:
    runs = [await client.asubmit(R.BatchTree, batch(llm, 2)) for _ in range(RUNS)]
    for run in runs:
        assert (await run.aresult(timeout=60)).status is Status.OK
    records = per_master(redis_cluster, keys.run("*"))
    assert sum(records) >= RUNS and all(records), records  # every master holds run records
    # each run's keys (record, events, unit records, snapshots...) on one master: the run's slot
    for run in runs[:5]:
        spread = per_master(redis_cluster, f"{keys.PREFIX}:{{{run.id}}}:*")
        assert sorted(spread)[:2] == [0, 0] and max(spread) >= 3, spread


async def test_a_gated_fan_out_runs_on_the_cluster_and_gives_every_slot_back(
    client: RunClient, redis_cluster: RedisCluster  # noqa: F811 - the imported fixture
) -> None:
    """40 units, limit 8: the 8 beyond the limit wait on the workers for slots kept in the run's own slot."""
    run = await client.asubmit(R.GatedNapsTree, R.Naps(seconds=0.05, count=40))
    assert (await run.aresult(timeout=60)).status is Status.OK, (await run.astatus()).error
    assert (await run.ablackboard()).results == ["rested"] * 40
    assert sum(per_master(redis_cluster, keys.gate("*", "*"))) == 0
