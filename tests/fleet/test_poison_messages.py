"""Malformed ("poison") messages on a real `celery -A worker worker`: each is refused, logged once, acknowledged
and never redelivered; the worker process never exits or stalls and keeps serving well-formed runs."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist import Status, Tree
from tasktree_dist.distributed import CeleryExecutor
from tasktree_dist.distributed.protocol import Completion
from tasktree_dist.testing.poison import FAILED_UNIT, Poison, poison_messages, publish
from tests import dist_trees as T
from tests.helpers import eventually, redis_db
from tests.helpers import run_with_executor as run

pytestmark = pytest.mark.timeout(60)

QUEUE = "poison"
ITEMS = 100
#: Celery's own lines when a message got past the guard: none may appear.
CELERY_TROUBLE = (
    "Unrecoverable error", "Can't decode message body", "Received and deleted unknown message",
    "Received unregistered task", "Received invalid task message", "raised unexpected", "Frequent restarts",
    "Connection to broker lost", "Traceback",
)

Gather100 = (
    Tree[T.Board]("PoisonGather100")
    .Gather(lambda b: ([T.DocTree] * ITEMS, [T.Doc(f"doc {i}") for i in range(ITEMS)]), concurrency_limit=ITEMS)
    .End()
)


@pytest.fixture(scope="module")
def poison_fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    """One real worker on its own queue, broker Redis db 10, data db 11 (flushed first); stopped by PID."""
    import redis

    from tasktree_dist.distributed import create_app
    from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, wait_until_ready

    env = fleet_env(redis_db(redis_url, 10), redis_db(redis_url, 11), "tests.dist_trees")
    settings = fleet_settings(env, queue=QUEUE)
    broker, data = redis.Redis.from_url(settings.broker_url), redis.Redis.from_url(settings.redis_url)
    broker.flushdb()
    data.flushdb()
    worker = WorkerProcess("poison1", env, queues=QUEUE, concurrency=16)
    try:
        worker.start()
        app = create_app(settings)
        wait_until_ready(app, [worker])
        assert worker.process is not None
        yield {"app": app, "settings": settings, "worker": worker, "pid": worker.process.pid, "broker": broker,
               "data": data}
    finally:
        worker.stop()
        broker.close()
        data.close()


def named(marker: str) -> str:
    """How a refusal line names a message id: quoted (the worker's refusals) or in brackets (the task's)."""
    return rf"(?:'{re.escape(marker)}'|\[{re.escape(marker)}\])"


def refusals(log: str, marker: str) -> int:
    return len(re.findall(rf"refused [^\n]*{named(marker)}", log))


async def test_poison_messages_are_refused_once_and_the_worker_keeps_serving(poison_fleet: dict[str, Any]) -> None:
    started = time.monotonic()
    worker, broker, data = poison_fleet["worker"], poison_fleet["broker"], poison_fleet["data"]
    messages = poison_messages(count=240, seed=7)
    assert len(messages) >= 200 and len({m.kind.split(":")[0].split("=")[0] for m in messages}) > 30
    assert publish(poison_fleet["settings"].broker_url, QUEUE, messages) == len(messages)

    # a normal run queued behind all of them, on the same worker
    executor = CeleryExecutor(poison_fleet["app"], settings=poison_fleet["settings"], queue=QUEUE)
    try:
        result, _ = await asyncio.wait_for(run(Gather100, T.Board(), executor), 30)
    except TimeoutError:
        replies = {key: data.llen(key) for key in data.scan_iter("tasktree:reply:*")}
        pytest.fail(f"the run queued behind the poison did not finish in 30 s (reply lists {replies})\n"
                    f"{worker.log()[-4000:]}")
    finally:
        await executor.aclose()
    assert result.status is Status.OK, result
    assert result.data == [f"DOC {i}" for i in range(ITEMS)]

    # the process never exited (same PID), and nothing stays queued or unacknowledged (nothing redelivered)
    assert worker.process is not None and worker.process.poll() is None
    assert worker.process.pid == poison_fleet["pid"]

    async def drained() -> bool:
        return broker.llen(QUEUE) == 0 and broker.hlen("unacked") == 0

    await eventually(drained, "an empty queue and no unacknowledged message", within=15,
                     detail=lambda: f"queue {broker.llen(QUEUE)}, unacked {broker.hlen('unacked')}")

    # every refusal named once, with what was wrong
    by_worker = [m for m in messages if m.refused_by == "worker"]
    by_task = [m for m in messages if m.refused_by == "task"]
    by_transport = [m for m in messages if m.refused_by == "transport"]
    assert by_worker and by_task and by_transport

    async def all_logged() -> bool:
        log = worker.log()
        return (log.count("refused a message on queue") >= len(by_worker) + len(by_transport)
                and log.count("refused the units of") >= len(by_task))

    await eventually(all_logged, "a refusal line per message", within=10, detail=lambda: worker.log()[-3000:])
    log = worker.log()
    assert log.count("refused a message on queue") == len(by_worker) + len(by_transport)
    assert log.count("(envelope unreadable)") == len(by_transport)
    assert log.count("refused the units of") == len(by_task)
    counts = Counter({m.marker: refusals(log, m.marker) for m in by_worker + by_task if m.marker})
    assert {marker: n for marker, n in counts.items() if n != 1} == {}
    assert all(f"queue '{QUEUE}'" in line for line in log.splitlines() if "refused a message" in line)
    trouble = [line for line in log.splitlines() if any(text in line for text in CELERY_TROUBLE)]
    assert trouble == [], "\n".join(trouble[:20])
    assert log.count("] Connected to ") == 1  # the consumer never reconnected

    def line(kind: str) -> str:
        message: Poison = next(m for m in messages if m.kind == kind)
        assert message.marker is not None
        return next(text for text in log.splitlines() if "refused" in text and re.search(named(message.marker), text))

    assert "expected [args, kwargs, embed]" in line("body: null")
    assert "expected [args, kwargs, embed]" in line("body: empty body")
    assert "header 'timelimit' is 'abc'" in line("header timelimit='abc'")
    assert "content type 'application/x-python-serialize' is not accepted" in line("content: pickle")
    assert "content type 'application/x-yaml' is not accepted" in line("content: yaml")
    assert "'celery.accumulate' is not a task this worker runs" in line("header task='celery.accumulate'")
    assert "embed" in line("body: embed callback") and "chains work" in line("body: embed callback")
    assert "units are str, expected a list" in line("units string")
    assert "6 of 6 units are not objects" in line("units of garbage")
    assert "no message id" in log and "no task name" in log
    # unit objects the runtime cannot read: dropped (no reply list) or FAILed, never a crash
    by_runtime = [m for m in messages if m.refused_by == "runtime"]
    assert by_runtime and log.count("dropping a unit that names no") >= len(by_runtime)

    # the unreadable unit that names a reply list got its FAIL completion there
    async def answered() -> list[bytes]:
        return data.lrange(FAILED_UNIT["reply_to"], 0, -1)

    [raw] = await eventually(answered, "the FAIL completion of the unreadable unit", within=10)
    completion = Completion.from_record(raw)
    assert completion.execution_id == FAILED_UNIT["execution_id"] and completion.status == "FAIL"
    assert time.monotonic() - started < 45
