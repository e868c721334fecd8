"""Celery tasks (stable, readable names for Flower): `tasktree.execute` runs a batch of units."""

from __future__ import annotations

from typing import Any

from celery import Celery


def register_tasks(app: Celery) -> None:
    @app.task(name="tasktree.execute", bind=True, ignore_result=True)
    def execute(
        self: Any,
        units: list[dict[str, Any]],
        tree: str = "",
        addresses: list[str] | None = None,
        run_id: str = "",
        **newer: Any,
    ) -> int:
        """Run units. Tree, addresses and run id are repeated in the arguments so Flower shows what runs and can
        search a run's messages; `newer` takes arguments a newer coordinator may add."""
        from ..core.log import logger
        from .poison import split_units
        from .runtime import get_runtime

        settings = app.tasktree_settings  # type: ignore[attr-defined]
        request = self.request
        meta = {
            "task_id": request.id or "",
            "hostname": request.hostname or "",
            "queue": (request.delivery_info or {}).get("routing_key", ""),
        }
        # a malformed `units` must not raise out of the task: what cannot be a unit is refused, logged once
        objects, problem = split_units(units)
        if problem is not None:
            logger.error("refused the units of tasktree.execute[%s] on queue %r: %s",
                         meta["task_id"], meta["queue"], problem)
        if objects:
            get_runtime(settings.redis_url, settings.reply_ttl, settings.lease_ttl).run_batch(objects, meta)
        return len(objects)
