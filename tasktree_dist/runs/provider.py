"""The runs package as distributed execution calls it (distributed.runs_interface.RunsProvider)."""

from __future__ import annotations

import threading
from typing import Any

from ..core.trace import TraceRoot
from .coordinator import coordinator_service, serves_runs_queue
from .scope import RunScope


class FleetRuns:
    """Runs recorded in Redis, coordinated inline or by the fleet's coordinators."""

    async def open_run(self, redis: Any, tree: Any, context: Any, root: TraceRoot, owner: str, reply: str,
                       settings: Any) -> RunScope:
        return await RunScope.open_on(redis, tree, context, root, owner, reply, settings)

    def offer(self, app: Any, run_id: str) -> str:
        return coordinator_service(app).offer(run_id)

    def outcome(self, app: Any, run_id: str, stop: threading.Event) -> str:
        return coordinator_service(app).outcome(run_id, stop)

    def worker_ready(self, app: Any, consumer: Any) -> None:
        if serves_runs_queue(consumer, app.tasktree_settings):
            coordinator_service(app)
