"""The core runs tests (an app submits and exits, cancel from another process, retry of failed units) on a
TLS-only redis-server whose only users are the least-privilege ACL users of docs/security.md: workers as
tasktree-worker, the applications as tasktree-coordinator; and a read-only board (tasktree-board) serving them.
Skipped, naming why, where redis-server lacks TLS."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist import RunClient, Status
from tasktree_dist.testing.secure_redis import SecureRedisServer
from tests import run_trees as R
from tests.fleet.test_runs import (  # noqa: F401 - the tests and fixtures run here, on this module's fleet
    client,
    llm,
    test_an_app_submits_and_exits_the_run_completes_in_the_fleet,
    test_cancel_from_another_process_stops_running_units_and_keeps_finished_work,
    test_retry_reruns_only_the_failed_units,
)
from tests.ops_fleet import served
from tests.secure_fleet import role_app, role_env, secure_redis, secure_workers

pytestmark = pytest.mark.timeout(150)

BROKER_DB, RUNS_DB = 0, 1


@pytest.fixture(scope="module")
def server() -> Iterator[SecureRedisServer]:
    with secure_redis() as server:
        yield server


@pytest.fixture(scope="module")
def runs_fleet(server: SecureRedisServer) -> Iterator[dict[str, Any]]:
    """Two workers (tasktree-worker) named runs1/runs2 as test_runs expects; the app is a coordinator's."""
    app = role_app(server, "coordinator", BROKER_DB, RUNS_DB)
    with secure_workers(server, "runs", BROKER_DB, RUNS_DB, concurrency=64) as workers:
        yield {"app": app, "settings": app.tasktree_settings, "workers": workers,
               "env": role_env(server, "coordinator", BROKER_DB, RUNS_DB)}
    refused = [entry for entry in server.acl_log() if entry.get("username") != "tasktree-board"]
    assert not refused, f"the documented ACL rules refused the fleet: {refused[:5]}"


def test_plain_connections_and_wrong_users_are_refused(server: SecureRedisServer) -> None:
    import redis

    with pytest.raises(redis.exceptions.ConnectionError):  # TLS only: a plain client cannot even talk
        redis.Redis(host=server.host, port=server.tls_port, socket_timeout=2).ping()
    board = redis.Redis.from_url(role_app(server, "board", BROKER_DB, RUNS_DB).tasktree_settings.redis_url)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            board.set("tasktree:run:x", "1")  # read-only outside the audit
        with pytest.raises(redis.exceptions.NoPermissionError):
            board.flushdb()
    finally:
        board.close()


def test_a_read_only_board_serves_the_runs(server: SecureRedisServer, runs_fleet: dict[str, Any]) -> None:
    runs = RunClient(runs_fleet["app"])
    try:
        run = runs.submit(R.NapsTree, R.Naps(seconds=0.1, count=3))
        assert runs.result(run.id, timeout=60).status is Status.OK
        token = "board-reader-0123456789"
        env = role_env(server, "board", BROKER_DB, RUNS_DB,
                       TASKTREE_API_TOKENS=json.dumps([{"name": "r", "token": token, "scopes": ["read"]}]))
        with served(env) as url:
            request = urllib.request.Request(f"{url}/api/runs/{run.id}", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read())["state"] == "succeeded"
            request = urllib.request.Request(f"{url}/api/runs/{run.id}/cancel", method="POST", data=b"",
                                             headers={"Authorization": f"Bearer {token}"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 403
        audit = server.admin(RUNS_DB).xrevrange("tasktree:audit", count=1)
        assert audit and audit[0][1][b"who"] == b"r" and audit[0][1][b"outcome"] == b"refused 403"
    finally:
        runs.close()
