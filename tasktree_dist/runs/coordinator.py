"""Coordinators in the fleet: each worker process serving the runs queue coordinates submitted runs on its event
loop, in up to TASKTREE_COORDINATOR_SLOTS at once, and supervises every active run.

A run is claimed atomically (runs.scripts.CLAIM): by the `tasktree.coordinate` task its submission sends (the
fast path), or by a supervisor that finds it queued and unclaimed, or running under a coordinator whose heartbeat
is gone. Claiming a run that was running resumes it by replay: the tree is walked again from the initial
blackboard, recorded unit completions are applied without sending them, units still running on live workers are
waited for, and only the rest is sent. The Celery message is a wake-up, not the run's only copy: a lost message,
a full process or a dead coordinator all end with a supervisor starting the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any

import orjson
from celery import Celery

from ..builder.spec_source import SpecError
from ..core.aio import reraise_if_cancelled
from ..core.context import Context
from ..core.errors import TasktreeError
from ..core.log import logger
from ..core.registry import get_tree
from ..core.serde import decode_value
from ..distributed import keys
from ..distributed.executor import CeleryExecutor
from ..distributed.routing import cannot_run_here
from ..distributed.runs_interface import NOT_HERE
from ..distributed.runtime import WorkerRuntime, get_runtime
from ..distributed.spec_trees import store_layout, tree_for_spec
from ..llm.batch import get_batch_queue
from .blackboards import typed_blackboard
from .model import RunError, RunMode, RunState
from .store import store_for
from .waits import catalogue_field


class RunFailedError(TasktreeError):
    """The run a `tasktree.coordinate` task coordinated failed (Flower shows the task failed, with the run's
    error); an expected error: Celery logs no traceback and never redelivers the message."""

#: A queued run no coordinator claimed this long after its creation is started by a supervisor (the
#: `tasktree.coordinate` message normally wins long before).
CLAIM_GRACE_S = 2.0


class CoordinatorService:
    def __init__(self, app: Celery, runtime: WorkerRuntime) -> None:
        self.app = app
        self.settings = app.tasktree_settings  # type: ignore[attr-defined]
        self.runtime = runtime
        self.me = runtime.process_id
        self.executor = CeleryExecutor(app, settings=self.settings)
        #: Runs coordinated here (a plain future while the claim is under way).
        self.active: dict[str, asyncio.Future[None]] = {}
        self._supervisor: asyncio.Future[None] | None = None
        #: `tasktree.coordinate` tasks waiting in a pool thread for their run (see `outcome`).
        self._threads_waiting = 0
        self._threads_lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        return self.settings.coordinator_slots - len(self.active)

    # -- from Celery's threads --------------------------------------------------------------------------------
    def offer(self, run_id: str, timeout: float = 30.0) -> str:
        """Try to start coordinating `run_id` here; returns at once with what happened."""
        return asyncio.run_coroutine_threadsafe(self.claim(run_id), self.runtime.loop).result(timeout)

    def outcome(self, run_id: str, stop: threading.Event) -> str:
        """Wait (in a Celery thread) until this process stops coordinating `run_id`; return how the run ended, or
        raise RunFailedError when it failed (Flower then shows the coordinate task failed). `stop` (the worker
        shutting down) ends the wait at once: a supervisor elsewhere takes the run over.

        At most half of the pool's threads wait so: with as many coordinator slots as threads, runs waiting would
        hold every thread and their own units none (seen: 128 runs stuck on two workers of 32 threads and 64 slots
        each). Past that the task returns at once and the run goes on here all the same."""
        pool = self.runtime.pool_threads or self.settings.worker_concurrency
        with self._threads_lock:
            if self._threads_waiting >= max(1, pool // 2):
                return (f"running here (not waited for in this thread: {self._threads_waiting} of the pool's {pool} "
                        "threads already wait for runs, the others run units)")
            self._threads_waiting += 1
        try:
            return self._wait_outcome(run_id, stop)
        finally:
            with self._threads_lock:
                self._threads_waiting -= 1

    def _wait_outcome(self, run_id: str, stop: threading.Event) -> str:
        loop = self.runtime.loop
        task = self.active.get(run_id)
        if task is not None:
            done = asyncio.run_coroutine_threadsafe(asyncio.wait([task]), loop)
            while True:
                try:
                    done.result(timeout=1.0)
                    break
                except concurrent.futures.TimeoutError:
                    if stop.is_set():
                        done.cancel()
                        return "still running: this worker is shutting down; another coordinator takes it over"
        async def read() -> Any:
            return await store_for(self.executor._dispatcher().redis, self.settings).status(run_id)

        status = asyncio.run_coroutine_threadsafe(read(), loop).result(30)
        if status is None:
            return "run expired"
        if status.state is RunState.FAILED:
            error = status.error.message if status.error else "no error recorded"
            where = f" at {status.error.node}" if status.error and status.error.node else ""
            raise RunFailedError(f"run {run_id} of tree {status.tree!r} failed{where}: {error[:500]}")
        return f"run {status.state.value}"

    def start_supervising(self) -> None:
        self.runtime.loop.call_soon_threadsafe(self._ensure_supervisor)

    # -- on the loop ------------------------------------------------------------------------------------------
    def _ensure_supervisor(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.ensure_future(self._supervise())

    async def claim(self, run_id: str) -> str:
        self._ensure_supervisor()
        if run_id in self.active:
            return "already coordinated here"
        if self.free_slots <= 0:
            return "busy: left queued for a coordinator with a free slot"
        dispatcher = self.executor._dispatcher()
        # the slot is taken before the first await: a supervisor and the run's `tasktree.coordinate` message
        # claiming it at once in this process would otherwise both win (the claim lets its owner claim again) and
        # coordinate it twice (seen with 10,000 runs queued: a unit sent twice, the run left running)
        self.active[run_id] = asyncio.get_running_loop().create_future()
        try:
            state, tree, fingerprint, spec = await dispatcher.redis.hmget(keys.run(run_id), "state", "tree",
                                                                          "fingerprint", "spec")
            if state == RunState.QUEUED.value.encode() and tree is not None and not spec:  # a spec: built here
                why = cannot_run_here(tree.decode(), (fingerprint or b"").decode())
                if why is not None:
                    self.active.pop(run_id, None)
                    return f"{NOT_HERE}: {why}"
            outcome, epoch = await store_for(dispatcher.redis, self.settings).claim(run_id, self.me,
                                                                                    dispatcher.reply_key)
        except BaseException:
            self.active.pop(run_id, None)
            raise
        if not outcome.ok:
            self.active.pop(run_id, None)
            return f"not claimed ({outcome.reason}: {outcome.detail})"
        if outcome.detail:
            logger.warning("run %s: taking it over from %s (heartbeat gone); resuming by replay", run_id,
                           outcome.detail)
        self.active[run_id] = asyncio.ensure_future(self._coordinate(run_id))
        return f"started (epoch {epoch})"

    async def _coordinate(self, run_id: str) -> None:
        store = store_for(self.executor._dispatcher().redis, self.settings)
        try:
            record = await store.record(run_id) or {}
            name = record.get("tree", "")
            try:
                tree = await self._tree(record)
            except (LookupError, SpecError) as exc:
                await self._fail(run_id, f"{exc} (coordinator {self.me}); list its module in TASKTREE_IMPORTS")
                return
            if not record.get("spec") and tree.fingerprint != record.get("fingerprint"):
                await self._fail(run_id, (
                    f"tree {name!r} here (coordinator {self.me}) has fingerprint {tree.fingerprint}, the run was "
                    f"submitted with {record.get('fingerprint')}: coordinator and submitter run different versions"))
                return
            encoded = await store.payload(record, "blackboard")
            blackboard = typed_blackboard(tree, decode_value(orjson.loads(encoded)) if encoded else None)
            context = Context(executor=self.executor, run_id=run_id)
            async with context.using_blackboard(blackboard):
                await tree(context)
            # the scope records the end; if it could not (its own error is in the trace), the run must not hang
            record = await store.record(run_id) or {}
            if record.get("state") == RunState.RUNNING.value and record.get("owner") == self.me:
                root = context.trace_root()
                error = next((n.attributes["error"] for n in root.walk() if "error" in n.attributes), "unknown")
                await self._fail(run_id, f"coordinator {self.me} could not run it: {error}")
        except Exception as exc:  # noqa: BLE001 - a coordinator bug must end the run, named, not hang it
            logger.exception("run %s: coordinating failed", run_id)
            await self._fail(run_id, f"coordinator {self.me} failed: {type(exc).__name__}: {exc}")
        finally:
            self.active.pop(run_id, None)

    async def _tree(self, record: dict[str, Any]) -> Any:
        """The run's tree: built from its stored spec, or registered here under its name."""
        digest = record.get("spec")
        if digest:
            redis = self.executor._dispatcher().redis
            tree = await tree_for_spec(redis, digest)
            await store_layout(redis, digest, tree, self.settings.run_retention)
            if record.get("id") and "waitdefs" not in record:  # its waits, for processes without the spec's parts
                await redis.hset(keys.run(record["id"]), "waitdefs", catalogue_field(tree))
            return tree
        return get_tree(record.get("tree", ""))

    async def _fail(self, run_id: str, message: str) -> None:
        store = store_for(self.executor._dispatcher().redis, self.settings)
        error = RunError(message=message)
        outcome = await store.transition(run_id, (RunState.RUNNING,), RunState.FAILED, owner=self.me,
                                         event={"error": message}, fields={"error": error.model_dump_json()})
        if not outcome.ok:  # stopped from outside before this coordinator got going: it writes nothing more
            await store.let_go(run_id, self.me)

    async def _fail_uncoordinated(self, run_id: str, tree: str, fingerprint: str) -> None:
        """FAIL a run queued for TASKTREE_UNRUNNABLE_LIMIT that no live worker of the runs queue can coordinate
        (none has its tree at its fingerprint), naming the live workers and their trees."""
        dispatcher = self.executor._dispatcher()
        why = await dispatcher.fleet.why_not(self.settings.runs_queue, tree, fingerprint)
        if why is None:
            return  # one can: its supervisor starts it
        message = f"nobody can coordinate run {run_id}: {why}"
        outcome = await store_for(dispatcher.redis, self.settings).transition(
            run_id, (RunState.QUEUED,), RunState.FAILED, event={"error": message},
            fields={"error": RunError(message=message).model_dump_json()})
        if outcome.ok:
            logger.error("run %s: %s", run_id, message)

    async def _supervise(self) -> None:
        """Look after every active run: start unclaimed ones, resume those whose coordinator died, fail inline
        runs whose process died. After Redis trouble, nobody is judged dead for a TTL: everyone's heartbeat may
        have lapsed during the outage, and their owners renew them now."""
        period = min(1.0, self.settings.lease_ttl / 3)
        grace_until = 0.0
        while True:
            await asyncio.sleep(period)  # a polling period, not synchronisation
            try:
                await self._supervise_once(judge=time.monotonic() >= grace_until)
            except Exception as exc:  # noqa: BLE001 - Redis away: try next period
                reraise_if_cancelled()
                grace_until = time.monotonic() + self.settings.lease_ttl + period
                logger.warning("supervising runs failed: %s: %s", type(exc).__name__, exc)

    async def _supervise_once(self, judge: bool = True) -> None:
        dispatcher = self.executor._dispatcher()
        store, redis = store_for(dispatcher.redis, self.settings), dispatcher.redis
        get_batch_queue(self.settings.redis_url).ensure_supervising()  # batches whose runs are parked are polled
        for run_id in await store.waits.wake_due():  # parked runs whose deadline passed
            logger.info("run %s: a wait's deadline passed; resuming it", run_id)
            if self.free_slots > 0:
                await self.claim(run_id)
        run_ids = [run_id for run_id in await store.active_runs() if run_id not in self.active]
        if not run_ids:
            return
        pipe = redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(keys.run(run_id), "state", "owner", "mode", "created_at", "tree", "fingerprint", "spec")
        records = await pipe.execute()
        owners = sorted({rec[1] for rec in records if rec[1]})
        pipe = redis.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(keys.heartbeat(owner.decode()))
        alive = {owner for owner, ok in zip(owners, await pipe.execute() if owners else [], strict=True) if ok}
        now = time.time()
        if store.cluster:  # index updates beside the run scripts: a process may have died between the two
            await store.prune_active(
                run_id for run_id, (state, _, _, created, *_) in zip(run_ids, records, strict=True)
                if (state is not None and state not in (b"queued", b"running"))
                or (state is None and not created and judge))
        for run_id, (state, owner, mode, created, tree, fingerprint, spec) in zip(run_ids, records, strict=True):
            if state is None or owner in alive or (owner and not judge):
                continue
            if mode != RunMode.INLINE.value.encode() and not spec and cannot_run_here(
                    (tree or b"").decode(), (fingerprint or b"").decode()) is not None:
                if not owner and now - float(created or now) > self.settings.unrunnable_limit:
                    await self._fail_uncoordinated(run_id, (tree or b"").decode(), (fingerprint or b"").decode())
                continue  # a process that has its tree takes it
            if owner and mode == RunMode.INLINE.value.encode():
                if await store.abandon(run_id, (
                    f"the process coordinating this inline run ({owner.decode()}) died; "
                    "RunClient.retry() resumes it in the fleet")):
                    logger.warning("run %s: its inline coordinator %s died; marked failed", run_id, owner.decode())
                continue
            unclaimed_long = not owner and now - float(created or now) > CLAIM_GRACE_S
            if (owner or unclaimed_long) and self.free_slots > 0:
                outcome = await self.claim(run_id)
                logger.info("run %s: supervisor: %s", run_id, outcome)


_services: dict[int, CoordinatorService] = {}
_lock = threading.Lock()


def coordinator_service(app: Celery) -> CoordinatorService:
    """The process's coordinator service for `app` (on the worker runtime's loop), started on first use."""
    with _lock:
        service = _services.get(id(app))
        runtime = get_runtime(app.tasktree_settings)  # type: ignore[attr-defined]
        if service is None or service.app is not app or service.runtime is not runtime:
            service = _services[id(app)] = CoordinatorService(app, runtime)
            service.start_supervising()
        return service


def serves_runs_queue(consumer: Any, settings: Any) -> bool:
    """Whether a worker's consumer reads the runs queue (only such workers coordinate and supervise runs)."""
    try:
        names = {queue.name for queue in consumer.task_consumer.queues}
    except AttributeError:
        return False
    return settings.runs_queue in names
