"""Celery tasks (stable, readable names for Flower): `tasktree.execute` runs a batch of units,
`tasktree.coordinate` starts coordinating a submitted run in this worker process."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from ..core.instruments import hooks as metrics


def install_dump_signal(runtime: Any) -> None:
    """`kill -USR2 <worker pid>` logs every task on the worker's event loop and where it waits (Celery's own
    SIGUSR1 dumps threads, which shows an idle loop thread and nothing of its coroutines)."""
    import signal

    from ..core.log import logger

    def dump(_signum: int, _frame: Any) -> None:
        logger.warning("%s", runtime.dump_tasks())

    signal.signal(signal.SIGUSR2, dump)


def register_tasks(app: Celery) -> None:
    @app.task(name="tasktree.execute", bind=True, ignore_result=True)
    def execute(
        self: Any,
        units: list[dict[str, Any]],
        tree: str = "",
        addresses: list[str] | None = None,
        run_id: str = "",
        **newer: Any,
    ) -> dict[str, Any]:
        """Run units; the result (shown by Flower) counts them and names the addresses that FAILed. Tree,
        addresses and run id are repeated in the arguments so Flower shows what runs and can search a run's
        messages; `newer` takes arguments a newer coordinator may add."""
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
        failed = get_runtime(settings).run_batch(objects, meta) if objects else []
        return {"units": len(objects), "failed": failed}

    @app.task(name="tasktree.coordinate", bind=True, ignore_result=True)
    def coordinate(self: Any, run_id: str, tree: str = "", labels: dict[str, str] | None = None,
                   **newer: Any) -> str:
        """Coordinate a submitted run on this process's event loop (not in this pool thread: a coordinator never
        holds a slot its units need). Returns at once with what happened: started, busy (left queued for a
        supervisor with a free slot), or why not (already owned, finished)."""
        from .runs_interface import runs_provider

        return runs_provider().offer(app, str(run_id))

    def received(sender: Any = None, request: Any = None, **_: Any) -> None:
        """Own a unit message's units the moment this worker receives it (prefetched included)."""
        if getattr(sender, "app", None) is not app or getattr(request, "name", "") != "tasktree.execute":
            return
        from .runtime import get_runtime

        args = request.args
        if isinstance(args, list | tuple) and args and isinstance(args[0], list):
            runtime = get_runtime(app.tasktree_settings, getattr(sender, "hostname", None))  # type: ignore[attr-defined]
            runtime.mark_received(args[0])

    def ready(sender: Any = None, **_: Any) -> None:
        """A worker reading the runs queue supervises runs from the start (not only after its first run)."""
        if getattr(sender, "app", None) is not app:
            return
        from .runs_interface import runs_provider
        from .runtime import get_runtime

        settings = app.tasktree_settings  # type: ignore[attr-defined]
        metrics.serve(settings)  # before the first beat, which publishes its address
        runtime = get_runtime(settings, getattr(sender, "hostname", None))
        try:
            runtime.queues = sorted(queue.name for queue in sender.task_consumer.queues)
        except AttributeError:
            pass
        runtime.heartbeat.beat()  # what this process serves is known to submitters now, not a beat later
        install_dump_signal(runtime)
        runs_provider().worker_ready(app, sender)
        from ..core.tuning import freeze_gc_once

        freeze_gc_once()  # what the worker imported stays out of every later full collection

    signals.task_received.connect(received, weak=False, dispatch_uid=f"tasktree-received-{id(app)}")
    signals.worker_ready.connect(ready, weak=False, dispatch_uid=f"tasktree-ready-{id(app)}")
