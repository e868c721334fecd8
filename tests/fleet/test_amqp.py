"""The AMQP broker: the same trees through two real workers on the local RabbitMQ (127.0.0.1:5672).

Blackboards, completions and traces still go through the private Redis (TASKTREE_REDIS_URL); only the Celery
messages ride RabbitMQ, on a queue unique to this run (deleted afterwards) so nothing else consumes them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from broker_config import TasktreeSettings
from tasktree_dist import Context, Result, Status, TraceNode
from tasktree_dist.distributed import CeleryExecutor, create_app
from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, running_workers
from tests import dist_trees as T
from tests.helpers import redis_db
from tests.helpers import run_with_executor as run

AMQP_URL = os.environ.get("TASKTREE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
AMQP_HOST, AMQP_PORT = urlsplit(AMQP_URL).hostname or "127.0.0.1", urlsplit(AMQP_URL).port or 5672

pytestmark = pytest.mark.timeout(90)


def rabbitmq_listening() -> bool:
    try:
        with socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def amqp_fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    """Two `celery -A worker worker` processes on RabbitMQ consuming one fresh queue; stopped by PID."""
    if not rabbitmq_listening():
        pytest.skip(f"no AMQP broker listening on {AMQP_HOST}:{AMQP_PORT} (start RabbitMQ to run the AMQP tests)")
    tag = uuid.uuid4().hex[:10]
    queue = f"tasktree-amqp-{tag}"
    env = fleet_env(AMQP_URL, redis_db(redis_url, 4), "tests.dist_trees", TASKTREE_QUEUE=queue)
    settings = TasktreeSettings(broker_url=AMQP_URL, redis_url=env["TASKTREE_REDIS_URL"], queue=queue)
    app = create_app(settings)
    # Unique hostnames: other workers may share this RabbitMQ vhost and answer the same ping.
    workers = [WorkerProcess(f"amqp1-{tag}", env, queues=queue, concurrency=8),
               WorkerProcess(f"amqp2-{tag}", env, queues=queue, concurrency=8)]
    try:
        with running_workers(app, workers, timeout=40) as names:
            yield {"app": app, "settings": settings, "queue": queue, "workers": workers, "names": names, "tag": tag}
    finally:
        try:  # best effort: the queue is durable and would outlive the run
            with app.connection_for_write() as connection:
                connection.default_channel.queue_delete(queue)
        except Exception as exc:  # noqa: BLE001 - cleanup only
            print(f"could not delete AMQP queue {queue}: {exc}")


@pytest.fixture
async def executor(amqp_fleet: dict[str, Any]) -> AsyncIterator[CeleryExecutor]:
    executor = CeleryExecutor(amqp_fleet["app"], queue=amqp_fleet["queue"], settings=amqp_fleet["settings"])
    try:
        yield executor
    finally:
        await executor.aclose()


def remote_nodes(context: Context) -> list[TraceNode]:
    return [node for node in context.trace_root().walk() if "worker" in node.attributes]


def assert_ran_on_amqp_workers(node: TraceNode, fleet: dict[str, Any]) -> None:
    attributes = node.attributes
    assert attributes["worker"] in fleet["names"], (attributes["worker"], fleet["names"])
    assert attributes["worker"].split("@")[0].endswith(fleet["tag"])
    assert attributes["pid"] != os.getpid() and attributes["pid"] in {w.process.pid for w in fleet["workers"]}
    assert attributes["queue"] == fleet["queue"]  # the AMQP routing key of the message
    assert attributes["celery_task_id"] and isinstance(attributes["queued_ms"], float)


async def test_basic_tree_over_amqp(executor: CeleryExecutor, amqp_fleet: dict[str, Any]) -> None:
    board = T.Board()
    items = board.items
    result, context = await run(T.Basic, board, executor)
    assert result == Result.OK("Item:x:1.5")
    assert board.n == 1 and board.items is items and board.items == [T.Item("x", 1.5)]
    assert board.where and not board.where.endswith(f":{os.getpid()}")
    functions = [node for node in context.trace_root().walk() if node.kind == "Function"]
    assert len(functions) == 3
    for node in functions:
        assert_ran_on_amqp_workers(node, amqp_fleet)


async def test_gather_over_amqp(executor: CeleryExecutor, amqp_fleet: dict[str, Any]) -> None:
    result, context = await run(T.GatherMany, T.Board(), executor)
    assert result.status is Status.OK
    assert result.data == [f"DOC {i}" for i in range(16)]
    gather = next(node for node in context.trace_root().walk() if node.kind == "Gather")
    children = gather.child_list()
    assert [child.name for child in children] == [f"{i}_Tree(DistDoc)" for i in range(16)]
    for child in children:
        assert_ran_on_amqp_workers(child, amqp_fleet)
    assert len(remote_nodes(context)) >= 16
