"""Celery tasks (stable, readable names for Flower): `tasktree.execute` runs a batch of units,
`tasktree.coordinate` starts coordinating a submitted run in this worker process."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals

from ..core.errors import TasktreeError
from ..core.instruments import hooks as metrics


class UnitsFailedError(TasktreeError):
    """A `tasktree.execute` message some of whose units FAILed: Flower shows the message failed, with the failed
    addresses and the first error (an expected error: Celery logs no traceback, and the message is acknowledged)."""


def install_dump_signal(runtime: Any) -> None:
    """`kill -USR2 <worker pid>` logs every task on the worker's event loop and where it waits (Celery's own
    SIGUSR1 dumps threads, which shows an idle loop thread and nothing of its coroutines)."""
    import signal

    from ..core.log import logger

    def dump(_signum: int, _frame: Any) -> None:
        logger.warning("%s", runtime.dump_tasks())

    signal.signal(signal.SIGUSR2, dump)


def warn_if_no_trees(settings: Any) -> None:
    """A worker with no tree can run no unit (it hands each back): say so loudly, once, at start."""
    from ..core.log import logger
    from ..core.registry import registered_trees

    if not registered_trees():
        logger.warning(
            "NO TREES REGISTERED in this worker (TASKTREE_IMPORTS=%r): it can run no unit and hands every unit "
            "back to its queue; set TASKTREE_IMPORTS to the modules that build your trees", settings.imports)


def register_tasks(app: Celery) -> None:
    shutting_down = threading.Event()

    @app.task(name="tasktree.execute", bind=True, ignore_result=True, throws=(UnitsFailedError,))
    def execute(
        self: Any,
        units: list[dict[str, Any]],
        tree: str = "",
        addresses: list[str] | None = None,
        run_id: str = "",
        *,
        handed_back: int = 0,
        **newer: Any,
    ) -> dict[str, Any]:
        """Run units; the result (shown by Flower) counts them. A message with a FAILed unit fails (Flower shows
        FAILURE naming the failed addresses and the first error), acknowledged all the same: never redelivered.
        Units of a tree this process does not have are handed back to their queue (its result says so; not a
        Celery Reject, which logs a traceback at each hand-back). Tree, addresses and run id are repeated in the
        arguments so Flower shows what runs and can search a run's messages; `newer` takes arguments a newer
        coordinator may add."""
        from ..core.log import logger
        from .poison import split_units
        from .routing import hand_back, split_runnable
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
        objects, foreign = split_runnable(objects)
        handed: list[str] = []
        for why, group in foreign.items():
            try:
                group = get_runtime(settings).wanted(group)  # a unit its coordinator gave up on stops circulating
            except Exception as exc:  # noqa: BLE001 - Redis away: hand them all back, the coordinator decides
                logger.warning("cannot tell which units are still wanted (%s: %s)", type(exc).__name__, exc)
            if not group:
                continue
            logger.info("handing back %d unit(s) of tasktree.execute[%s] (handed back %d times): %s",
                        len(group), meta["task_id"], handed_back, why)
            try:
                hand_back(app, group, handed_back)
            except Exception as exc:  # the broker refused the copy: it keeps the original (re-raised, requeued)
                from celery.exceptions import Reject

                logger.warning("handing back failed (%s: %s): the message goes back to its queue", type(exc).__name__,
                               exc)
                raise Reject(f"hand-back failed: {exc}", requeue=True) from exc
            metrics.units_handed_back(str(group[0].get("tree")), meta["queue"], len(group))
            handed.append(f"{len(group)} unit(s): {why}")
        if not objects:
            return {"units": 0, "failed": [], **({"handed_back": handed} if handed else {})}
        failed = get_runtime(settings).run_batch(objects, meta)
        if failed:
            raise UnitsFailedError(
                f"{len(failed)} of {len(objects)} units FAILed: {', '.join(where for where, _ in failed[:10])}"
                f"{' ...' if len(failed) > 10 else ''}; first error: {failed[0][1][:300]}"
            )
        return {"units": len(objects), "failed": [], **({"handed_back": handed} if handed else {})}

    # acknowledged on receipt: the task waits for its run (hours, maybe), and an unacknowledged message would come
    # back after the broker's visibility timeout; the run record, not the message, is the run's durable copy
    @app.task(name="tasktree.coordinate", bind=True, ignore_result=True, throws=(TasktreeError,), acks_late=False)
    def coordinate(self: Any, run_id: str, tree: str = "", labels: dict[str, str] | None = None, *,
                   handed_back: int = 0, **newer: Any) -> str:
        """Coordinate a submitted run on this process's event loop (not in this pool thread: a coordinator never
        holds a slot its units need; this thread only waits, at most TASKTREE_COORDINATOR_SLOTS of them). Ends
        with the run: FAILURE (in Flower) naming the run's error when it failed, else how it ended; or at once
        with why not (busy: left queued for a supervisor with a free slot; already owned; finished). A process
        without the run's tree hands the message back for one that has it."""
        from .routing import hand_back_run
        from .runs_interface import NOT_HERE, runs_provider

        runs = runs_provider()
        outcome = runs.offer(app, str(run_id))
        if outcome.startswith(NOT_HERE):
            return f"{outcome}; {hand_back_run(app, str(run_id), tree, labels or {}, handed_back)}"
        if not outcome.startswith("started"):
            return outcome
        return runs.outcome(app, str(run_id), shutting_down)

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
        limit = getattr(getattr(sender, "pool", None), "limit", None)
        runtime.pool_threads = limit if isinstance(limit, int) and limit > 0 else None
        runtime.heartbeat.beat()  # what this process serves is known to submitters now, not a beat later
        warn_if_no_trees(settings)
        install_dump_signal(runtime)
        runtime.watch_loop()
        runs_provider().worker_ready(app, sender)
        from ..core.tuning import freeze_gc_once

        freeze_gc_once()  # what the worker imported stays out of every later full collection

    def stopping(**_: Any) -> None:
        shutting_down.set()  # coordinate tasks stop waiting for their runs: a warm shutdown does not wait for runs

    signals.worker_shutting_down.connect(stopping, weak=False, dispatch_uid=f"tasktree-stopping-{id(app)}")
    signals.task_received.connect(received, weak=False, dispatch_uid=f"tasktree-received-{id(app)}")
    signals.worker_ready.connect(ready, weak=False, dispatch_uid=f"tasktree-ready-{id(app)}")
