"""A worker whose event loop is blocked by user code (a `time.sleep` in an async Function) longer than
TASKTREE_STUCK_LOOP_S logs the blocking stack and exits (status 70); once a worker is back (compose's `restart:`
plays this part in production) its run is taken over and its unit sent again, and the run succeeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tasktree_dist import RunClient, Status
from tasktree_dist.distributed import create_app
from tasktree_dist.distributed.stuck import EXIT_STUCK
from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, running_workers, wait_until_ready
from tasktree_dist.testing.redis_server import RedisServer
from tests import loud_trees as L
from tests.ops_fleet import wait_for

pytestmark = pytest.mark.timeout(120)

STUCK_LOOP_S = "2"
LEASE_TTL = "3"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


async def test_a_blocked_loop_exits_the_worker_and_its_run_heals(redis_url: str, tmp_path: Path) -> None:
    health = tmp_path / "alive"
    env = fleet_env(f"{redis_url}/0", f"{redis_url}/1", "tests.loud_trees", TASKTREE_STUCK_LOOP_S=STUCK_LOOP_S,
                    TASKTREE_LEASE_TTL=LEASE_TTL, TASKTREE_HEALTH_FILE=str(health))
    settings = fleet_settings(env, lease_ttl=float(LEASE_TTL))
    app = create_app(settings)
    stuck = WorkerProcess("stuck", {**env, "TASKTREE_TEST_BLOCK_LOOP": "1"}, concurrency=4)
    fresh = WorkerProcess("fresh", env, concurrency=4)
    client = RunClient(app, settings=settings)
    try:
        stuck.start()
        wait_until_ready(app, [stuck])
        # while its loop answers, the worker touches its health file (what compose's probe looks at)
        wait_for(health.exists, "the health file touched", within=10)
        touched = health.stat().st_mtime
        wait_for(lambda: health.stat().st_mtime > touched, "the health file touched again", within=10)
        run = await client.asubmit(L.BlockerTree, L.Nap(seconds=60))
        # the unit blocks the loop for 60 s: the watchdog ends the process after about 2 s
        assert stuck.process is not None
        code = wait_for(lambda: stuck.process.poll(), "the stuck worker exiting", within=30)  # type: ignore[union-attr]
        log = stuck.log()
        assert code == EXIT_STUCK, log[-3000:]
        assert "has not answered for" in log and "TASKTREE_STUCK_LOOP_S=2" in log, log[-3000:]
        assert "in block" in log and "time.sleep(n.seconds)" in log, log[-3000:]  # the blocking code's stack
        # a worker comes back (restart:): the run is taken over by replay and its unit sent again
        with running_workers(app, [fresh]):
            result = await run.aresult(timeout=60)
        assert result.status is Status.OK and result.data == "woke", fresh.log()[-3000:]
        status = await run.astatus()
        assert status.state.value == "succeeded"
    finally:
        await client.aclose()
        stuck.stop()
