"""Connects the protocols lower layers define to the packages above that implement them.

`core.instruments` gets the Prometheus hooks of `metrics`; `distributed.runs_interface` gets the runs package and
`llm.batch_park` its batch-wait listener (runs.batch_waits), each loaded on its first call (Celery and Redis clients
are not imported before).
"""

from __future__ import annotations

from typing import Any

from . import metrics  # noqa: F401  (importing it installs the Prometheus hooks into core.instruments)
from .distributed.runs_interface import install_runs
from .llm.batch_park import install_batch_listener


class _RunsOnFirstUse:
    """distributed.runs_interface.RunsProvider that imports tasktree_dist.runs on its first call."""

    _runs: Any = None

    def _load(self) -> Any:
        if self._runs is None:
            from .runs.provider import FleetRuns

            self._runs = FleetRuns()
        return self._runs

    async def open_run(self, *args: Any) -> Any:
        return await self._load().open_run(*args)

    def offer(self, app: Any, run_id: str) -> str:
        return self._load().offer(app, run_id)

    def outcome(self, app: Any, run_id: str, stop: Any) -> str:
        return self._load().outcome(app, run_id, stop)

    def worker_ready(self, app: Any, consumer: Any) -> None:
        self._load().worker_ready(app, consumer)


class _BatchWaitsOnFirstUse:
    """llm.batch_park.BatchListener that imports runs.batch_waits on its first call."""

    async def calls_answered(self, redis: Any, answers: list[tuple[str, str, dict[str, Any]]]) -> None:
        from .runs.batch_waits import BatchWaits

        await BatchWaits().calls_answered(redis, answers)


install_runs(_RunsOnFirstUse())
install_batch_listener(_BatchWaitsOnFirstUse())
