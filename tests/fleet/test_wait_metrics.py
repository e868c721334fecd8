"""Parking and waking are run state transitions too: the process that makes them counts them (issue 16's rule that
every transition is a metric, for the state waits added)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import REGISTRY

from tasktree_dist.runs.model import RunState
from tasktree_dist.runs.store import RunStore


def transitions(state: str) -> float:
    return REGISTRY.get_sample_value("tasktree_run_transitions_total", {"state": state}) or 0.0


async def test_parking_and_a_passed_deadline_count_as_transitions(redis_client: Any) -> None:
    import tasktree_dist  # noqa: F401  (installs the Prometheus hooks)

    store = RunStore(redis_client, 600, 1000)
    run_id = f"park-{time.time_ns()}"
    assert await store.create(run_id, RunState.RUNNING, {"tree": "T", "reply": "r"}, owner="me")
    epoch = int((await store.record(run_id) or {}).get("epoch") or 1)
    waiting, queued = transitions("waiting"), transitions("queued")
    assert await store.waits.park(run_id, "me", epoch, time.time() - 1, []) == ("ok", "")
    assert transitions("waiting") == waiting + 1
    assert await store.waits.wake_due() == [run_id]  # its deadline is past: queued again
    assert transitions("queued") == queued + 1
    assert (await store.record(run_id) or {}).get("state") == "queued"
