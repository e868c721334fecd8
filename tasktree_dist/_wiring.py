"""Connects the protocols lower layers define to the packages above that implement them.

`core.instruments` gets the Prometheus hooks of `metrics`; `distributed.runs_interface` gets the runs package,
loaded the first time a run is opened or offered (Celery and Redis clients are not imported before).
"""

from __future__ import annotations

from typing import Any

from . import metrics  # noqa: F401  (importing it installs the Prometheus hooks into core.instruments)
from .distributed.runs_interface import install_runs


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


install_runs(_RunsOnFirstUse())
