"""The worker side: one long-lived event loop per process runs every unit this process receives.

Celery's threads pool hands each message to a thread, which submits the message's units to the loop and waits.
So a process runs many units concurrently (I/O-bound LLM calls need no process each), async clients
(redis.asyncio, AsyncOpenAI) are created once per loop and reused, and a finished unit's completion is
recorded in Redis whatever happened: an error is a FAIL completion, never a lost unit.

Ownership: a unit belongs to this process from the moment Celery *receives* its message (prefetched included,
see `mark_received`), and the process's heartbeat (distributed.liveness) says it is alive; when the heartbeat expires
the coordinator sends the unit again. Redis round trips are shared (scripts.py): one script call per message
admits its units, completions finishing together leave in one script call.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import orjson

from ..core.aio import reraise_if_cancelled
from ..core.context import Context
from ..core.errors import TasktreeError
from ..core.instruments import hooks as metrics
from ..core.log import logger
from ..core.redis_client import connect, same_slot
from ..core.result import Status
from ..core.run_events import set_event_sink
from ..core.serde import decode_value, encode_value
from ..core.settings import TasktreeSettings
from ..core.trace import TraceNode, fragment_alerts
from ..core.tuning import new_event_loop
from ..llm.batch import calls_waiting_in_place
from ..llm.batch_park import BatchPending, parkable
from . import changes, keys
from .gates import SlotGates, gate_key
from .liveness import Heartbeat, adopt_heartbeat, registered_process_info
from .protocol import Completion, Unit
from .redis_retry import REDIS_ERRORS, retrying
from .replicas import replicas_for
from .routing import split_runnable
from .scripts import ALREADY_DONE, CANCELLED, DUPLICATE, ORPHAN, SET_EACH, Outgoing, WorkerScripts
from .spec_trees import resolve_tree
from .stuck import LoopWatchdog

T = TypeVar("T")

#: Redis connections of one worker process's loop, shared by all the units it runs.
REDIS_MAX_CONNECTIONS = 64
#: Snapshots kept in memory per process (Gather children often share one).
SNAPSHOT_CACHE = 256
#: How often running units look for a cancellation (their own, or their run's).
CANCEL_POLL_S = 0.5


@dataclass
class Start:
    """When a unit started running here (after any wait for a fan-out slot), and whether the metrics counted it."""

    at: float
    counted: bool = False


class UnitError(TasktreeError):
    """A unit that cannot run here (unknown tree, other version, unknown address, expired snapshot)."""


class WorkerRuntime:
    def __init__(
        self, settings: TasktreeSettings, snapshot_cache: int = SNAPSHOT_CACHE, name: str | None = None
    ) -> None:
        self.settings = settings
        self.redis_url = settings.redis_url
        self.snapshot_cache = snapshot_cache
        self.pid = os.getpid()
        self.heartbeat = Heartbeat(self.redis_url, settings.lease_ttl, info=self._info, name=name)
        self.process_id = self.heartbeat.process_id
        self.queues: list[str] = []
        #: Threads of the Celery pool that hands this process its messages (set when the worker is ready).
        self.pool_threads: int | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis: Any = None
        self._marker: Any = None
        self._marker_client: Any = None
        self._scripts: WorkerScripts
        self._gates: SlotGates
        self._snapshots: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._outbox: list[tuple[Outgoing, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._watchdog: LoopWatchdog | None = None
        self._thread = threading.Thread(target=self._serve, name="tasktree-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        self.heartbeat.start()
        adopt_heartbeat(self.heartbeat)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _info(self) -> dict[str, Any]:
        gates = getattr(self, "_gates", None)
        waiting = gates.waiting if gates is not None else 0
        return registered_process_info({"role": "worker", "queues": self.queues,
                                        "running": len(self._running) - waiting, "waiting_for_slot": waiting,
                                        "batch_waits_in_place": calls_waiting_in_place()})

    def _serve(self) -> None:
        self._loop = new_event_loop()
        asyncio.set_event_loop(self._loop)
        # redis-py's default pool raises MaxConnectionsError as soon as its connections are busy, which hundreds of
        # units on this loop reach; a blocking pool makes a command wait for a free connection.
        self._redis = connect(self.redis_url, asynchronous=True, max_connections=REDIS_MAX_CONNECTIONS)
        self._scripts = WorkerScripts(self._redis, replicas_for(self._redis, self.settings))
        self._gates = SlotGates(self._scripts, self.settings.reply_ttl, self.settings.gate_poll_s)
        set_event_sink(self._emit_event, self._loop)
        self._ready.set()
        self._loop.run_forever()

    async def _emit_event(self, run_id: str, kind: str, data: dict[str, Any]) -> None:
        """A node's typed event (core.run_events) into its run's stream, capped and expiring like the run's."""
        name = keys.events(run_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(name, {"type": kind, "data": orjson.dumps(data, default=str)}, maxlen=self.settings.events_max,
                  approximate=True)
        pipe.expire(name, self.settings.run_retention)
        await pipe.execute()

    def watch_loop(self) -> None:
        """Exit this process if user code blocks its loop longer than TASKTREE_STUCK_LOOP_S (see stuck.py);
        started by a real worker (`ready`), not by a runtime embedded in another program."""
        if self._watchdog is None and (self.settings.stuck_loop_s > 0 or self.settings.health_file):
            limit = self.settings.stuck_loop_s or float("inf")  # 0: never exits, still touches the health file
            self._watchdog = LoopWatchdog(self.loop, self._thread, limit, self.process_id,
                                          health_file=self.settings.health_file).start()

    def close(self, timeout: float = 5.0) -> None:
        """Close Redis, stop the heartbeat and the loop (tests; a worker process just exits)."""
        assert self._loop is not None

        async def shutdown() -> None:
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._redis.aclose()

        self.heartbeat.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._marker is not None:
            self._marker.registered_client.close()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def dump_tasks(self) -> str:
        """Every task on this process's loop with where it waits (SIGUSR2 logs it: see install_dump_signal)."""
        import io

        out = io.StringIO()
        tasks = asyncio.all_tasks(self.loop)
        out.write(f"{len(tasks)} tasks on the tasktree loop of {self.process_id}\n")
        for task in tasks:
            task.print_stack(limit=12, file=out)
        return out.getvalue()

    # -- called from Celery's threads -----------------------------------------------------------------------
    def mark_received(self, units: list[Any]) -> None:
        """Own the units of a message Celery just received (called in the consumer thread, before a pool thread
        takes it; synchronous, so nothing this process holds is ever unmarked): if this process dies with the
        message prefetched, its heartbeat expiring tells the coordinator to send the units again. Units of a tree
        this process does not have are not marked: it hands them back (routing) for a process that has it."""
        runnable = split_runnable([raw for raw in units if isinstance(raw, dict)])[0]
        owners = [keys.owner(raw["run_id"], raw["execution_id"]) for raw in runnable
                  if isinstance(raw.get("run_id"), str) and isinstance(raw.get("execution_id"), str)]
        if not owners:
            return
        try:
            if self._marker is None:
                self._marker_client = connect(self.redis_url, asynchronous=False, socket_timeout=1.0,
                                              socket_connect_timeout=1.0)
                self._marker = self._marker_client.register_script(SET_EACH)
            for group in same_slot(self._marker_client, owners, str):  # one call on a single Redis
                self._marker(keys=group, args=[self.settings.reply_ttl, "NX", self.process_id])
        except Exception as exc:  # noqa: BLE001 - Redis away: the units are owned at admission anyway
            logger.warning("marking %d received units failed: %s: %s", len(owners), type(exc).__name__, exc)

    def run_batch(self, units: list[dict[str, Any]], meta: dict[str, Any]) -> list[tuple[str, str]]:
        """Run a message's units on the loop; returns (address, error) of those that FAILed (for Flower)."""
        return asyncio.run_coroutine_threadsafe(self._run_batch(units, meta), self.loop).result()

    def wanted(self, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The units still worth handing on: not given up by their coordinator, their run not over."""
        return asyncio.run_coroutine_threadsafe(self._wanted(units), self.loop).result(self.settings.lease_ttl)

    async def _wanted(self, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = [(str(unit.get("execution_id")), str(unit.get("run_id"))) for unit in units]
        given_up = await self._given_up(ids)
        return [unit for unit, (execution_id, _) in zip(units, ids, strict=True) if execution_id not in given_up]

    async def _given_up(self, units: list[tuple[str, str]]) -> set[str]:
        """Of (execution id, run id) pairs, the execution ids cancelled by their coordinator or whose run is over
        (finished, cancelled or expired)."""
        run_ids = sorted({run_id for _, run_id in units})
        groups = same_slot(self._redis, units, lambda unit: keys.run(unit[1]))  # one MGET on a single Redis
        pipe = self._redis.pipeline(transaction=False)
        for group in groups:
            pipe.mget([keys.cancel(run_id, execution_id) for execution_id, run_id in group])
        for run_id in run_ids:
            pipe.hget(keys.run(run_id), "state")
        answers = await pipe.execute()
        marked = {unit: flag for group, flags in zip(groups, answers, strict=False)
                  for unit, flag in zip(group, flags, strict=True)}
        flags, states = [marked[unit] for unit in units], answers[len(groups):]
        over = {run_id for run_id, state in zip(run_ids, states, strict=True)
                if state is None or state in (b"succeeded", b"failed", b"cancelled")}
        return {execution_id for (execution_id, run_id), flag in zip(units, flags, strict=True)
                if flag is not None or run_id in over}

    # -- on the loop ------------------------------------------------------------------------------------------
    async def _run_batch(self, raws: list[dict[str, Any]], meta: dict[str, Any]) -> list[tuple[str, str]]:
        started = time.time()
        units = []
        failed: list[tuple[str, str]] = []
        for raw in raws:
            try:
                units.append(Unit.model_validate(raw))
            except ValueError as exc:
                where = str(raw.get("execution_id", "?")) if isinstance(raw, dict) else "?"
                failed.append((where, await self._reject(raw, exc, meta)))
        if not units:
            return failed
        # the batch holds its own snapshots: other batches may evict them from the cache before these units run
        payloads = {unit.snapshot: self._snapshots.get(unit.snapshot) for unit in units}
        missing = sorted(key for key, payload in payloads.items() if payload is None)
        flags, fetched = await retrying(
            lambda: self._scripts.admit(
                [(unit.run_id, unit.execution_id, unit.reply_to) for unit in units], missing, self.process_id,
                self.settings.reply_ttl,
            ),
            f"admitting {len(units)} units",
            self.settings.redis_outage_limit,
        )
        for key, payload in zip(missing, fetched, strict=True):
            payloads[key] = payload
            if payload is not None:
                self._remember_snapshot(key, payload)
        runs = []
        for unit, flag in zip(units, flags, strict=True):
            if flag & (ALREADY_DONE | DUPLICATE | ORPHAN):
                # answered from its record / running on another live process / its run is over or unknown
                if flag & ORPHAN:
                    logger.info("dropping unit %s: run %s is finished or unknown", unit.where, unit.run_id)
                continue
            runs.append(self._run_unit(unit, payloads[unit.snapshot], meta, bool(flag & CANCELLED), started))
        outcomes = await asyncio.gather(*runs)
        return failed + [where for where in outcomes if where]

    async def _reject(self, raw: Any, exc: Exception, meta: dict[str, Any]) -> str:
        """A unit this worker cannot read (another tasktree_dist version?): FAIL it if it says where it belongs."""
        fields = raw if isinstance(raw, dict) else {}
        run_id, execution_id, reply_to = (fields.get(k) for k in ("run_id", "execution_id", "reply_to"))
        worker = meta.get("hostname") or self.process_id
        error = (f"unreadable unit (coordinator and worker {worker} run different tasktree_dist versions?): "
                 f"{' '.join(str(exc).split())[:500]}")
        if not (isinstance(run_id, str) and isinstance(execution_id, str)):
            logger.error("dropping a unit that names no run or execution id: %s; %.300r", error, raw)
            return error
        # only a tasktree reply list is written to; otherwise the run record's own says where answers go
        fallback = reply_to if isinstance(reply_to, str) and reply_to.startswith(keys.reply("")) else ""
        completion = Completion(execution_id=execution_id, status="FAIL", error=error,
                                worker=meta.get("hostname", ""), pid=self.pid)
        await self._publish(run_id, execution_id, fallback, completion, execution_id)
        return error

    def _remember_snapshot(self, key: str, payload: bytes) -> None:
        self._snapshots[key] = payload
        if len(self._snapshots) > self.snapshot_cache:
            self._snapshots.popitem(last=False)

    async def _run_unit(
        self, unit: Unit, snapshot: bytes | None, meta: dict[str, Any], cancelled: bool, started: float
    ) -> tuple[str, str] | None:
        """Run one unit and publish its completion; returns its address and error if it FAILed."""
        completion = Completion(
            execution_id=unit.execution_id, status="FAIL", worker=meta.get("hostname", ""), pid=self.pid,
            celery_task_id=meta.get("task_id", ""), queue=unit.queue,
            queued_ms=round(max(0.0, started - unit.sent_at) * 1000, 3),
        )
        begun = Start(started)
        try:
            if cancelled:
                completion.error = "cancelled before it started"
            else:
                await self._cancellable(unit, snapshot, completion, begun)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr] - the loop itself is stopping
                raise
            completion.status = "FAIL"
            completion.error = ("cancelled by the coordinator while running" if begun.counted else
                                "cancelled by the coordinator while it waited for a slot")
        except Exception as exc:  # noqa: BLE001 - whatever happens, the coordinator hears about it
            completion.status, completion.error = "FAIL", f"{type(exc).__name__}: {exc}"
        completion.run_ms = round((time.time() - begun.at) * 1000, 3)
        if not begun.counted:  # it never started (cancelled while it waited)
            metrics.unit_started(unit.tree, unit.queue, completion.queued_ms)
        if completion.error:
            completion.error = f"{completion.error} [unit {unit.where} on worker {completion.worker or self.pid}]"
        metrics.unit_finished(unit.tree, unit.queue, completion.ok, completion.run_ms)
        await self._publish(unit.run_id, unit.execution_id, unit.reply_to, completion, unit.where,
                            slim=not unit.reply_trace and completion.ok, gate=gate_key(unit),
                            hand_on=self._gates.hand_on(unit) if unit.gate else "")
        if completion.ok:
            return None
        first = next((f"{path}: {message}" for path, level, message in fragment_alerts(completion.trace or {})
                      if level == "error"), "its node returned FAIL")
        return unit.where, completion.error or first

    async def _cancellable(self, unit: Unit, snapshot: bytes | None, completion: Completion,
                           begun: Start) -> None:
        """Run the unit as a task the cancel watcher can stop when the coordinator gives up on it (also while it
        waits for a slot of its fan-out)."""
        task = asyncio.get_running_loop().create_task(self._gated(unit, snapshot, completion, begun))
        self._running[unit.execution_id] = (unit.run_id, task)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_cancellations())
        try:
            await task
        finally:
            self._running.pop(unit.execution_id, None)

    async def _watch_cancellations(self) -> None:
        """One poll for all running units of this process: a unit given up on, or whose run was cancelled or
        finished, stops here within a second."""
        while self._running:
            await asyncio.sleep(CANCEL_POLL_S)  # a polling period, not synchronisation
            running = dict(self._running)
            try:
                given_up = await self._given_up([(execution_id, run_id) for execution_id, (run_id, _) in
                                                 running.items()])
            except Exception as exc:  # noqa: BLE001 - Redis blip: poll again next period
                reraise_if_cancelled()
                logger.warning("polling cancellations failed: %s: %s", type(exc).__name__, exc)
                continue
            for execution_id in given_up:
                running[execution_id][1].cancel()

    async def _gated(self, unit: Unit, snapshot: bytes | None, completion: Completion, begun: Start) -> None:
        """Wait for a slot of the unit's fan-out (distributed.gates) when it has a gate, then run it; the wait counts
        as queued (`queued_ms`), not as running, and starts the unit's metrics when it ends."""
        if unit.gate:
            await self._gates.take(unit)
            begun.at = time.time()
            completion.queued_ms = round(max(0.0, begun.at - unit.sent_at) * 1000, 3)
        metrics.unit_started(unit.tree, unit.queue, completion.queued_ms)
        begun.counted = True
        await self._execute(unit, snapshot, completion)

    async def _execute(self, unit: Unit, snapshot: bytes | None, completion: Completion) -> None:
        tree = await resolve_tree(self._redis, unit.tree)
        if tree.fingerprint != unit.fingerprint:
            raise UnitError(
                f"tree {unit.tree!r} here has fingerprint {tree.fingerprint}, the coordinator sent "
                f"{unit.fingerprint}: workers and coordinator run different versions of the tree; redeploy"
            )
        target = tree.node(unit.address) if unit.address else tree
        if snapshot is None:
            raise UnitError(f"blackboard snapshot {unit.snapshot} has expired or was never stored")
        before = orjson.loads(snapshot)
        blackboard = decode_value(before)
        context = Context(run_id=unit.run_id, last_result=decode_value(unit.last_result))
        context.unit_id = unit.batch_origin or unit.execution_id
        context._blackboards.append(blackboard)
        holder = TraceNode("unit")
        context._tracer = holder
        with parkable(unit.batch_awaited) as parking:
            try:
                if unit.address:
                    result = await target(context)
                else:
                    result = await target(context, index=unit.index)
            except BatchPending:
                # its batched calls are out: the unit ends now (no slot held while they are), not done; the
                # coordinator sends it again once they are answered
                completion.status, completion.awaiting = "OK", sorted(set(parking.pending))
                return
        fragment = holder._children[0] if holder._children else None
        completion.trace = fragment.to_fragment() if fragment is not None else None
        if not unit.reply_trace and fragment is not None:
            completion.totals = {"cost": fragment.total_cost(), "tokens": fragment.total_tokens()}
            completion.alerts = fragment_alerts(completion.trace) or None  # type: ignore[arg-type]
        completion.status = "OK" if result.status is Status.OK else "FAIL"
        completion.data = encode_value(result.data, "result.data")
        completion.changes = changes.diff(before, encode_value(blackboard, "blackboard"))

    async def _publish(
        self, run_id: str, execution_id: str, reply_to: str, completion: Completion, where: str, slim: bool = False,
        gate: str = "", hand_on: str = "",
    ) -> None:
        """Queue the completion; completions finishing in the same loop iteration share one script call. `slim`:
        the coordinator gets it without its trace fragment (the unit record keeps the whole completion). `gate`:
        the unit's slot is released with its record, or handed on to the unit `hand_on` (distributed.gates)."""
        event = orjson.dumps({
            "execution_id": execution_id, "node": where, "status": "OK" if completion.ok else "FAIL",
            "ms": completion.run_ms, "queued_ms": completion.queued_ms, "worker": completion.worker,
            **({"error": completion.error[:500]} if completion.error else {}),
        })
        record = completion.to_record()
        reply = completion.model_dump_json(exclude={"trace"}).encode() if slim else b""
        outgoing = Outgoing(run_id, execution_id, "OK" if completion.ok else "FAIL", record, event, reply_to, reply,
                            gate, hand_on)
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] = loop.create_future()
        self._outbox.append((outgoing, sent))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        await sent

    async def _flush(self) -> None:
        """Publish what is waiting, retrying through Redis outages: a completion is never dropped while the process
        lives (its run's coordinator decides how long to wait, TASKTREE_REDIS_OUTAGE_LIMIT)."""
        settings = self.settings
        while self._outbox:
            await asyncio.sleep(0)  # one loop iteration: let units finishing together join this batch
            batch, self._outbox = self._outbox, []
            publish = partial(self._scripts.publish, [item for item, _ in batch], settings.reply_ttl,
                              settings.run_retention, settings.events_max)
            while True:
                try:
                    await retrying(publish, f"publishing {len(batch)} completions", settings.redis_outage_limit)
                    break
                except REDIS_ERRORS as exc:
                    reraise_if_cancelled()
                    logger.error("Redis unreachable for %.0f s while publishing %d completions (%s); still trying",
                                 settings.redis_outage_limit, len(batch), exc)
                except Exception as exc:  # noqa: BLE001 - a script error: these completions cannot be recorded
                    reraise_if_cancelled()
                    logger.error("cannot publish %d completions: %s: %s", len(batch), type(exc).__name__, exc)
                    break
            for _, sent in batch:
                if not sent.done():
                    sent.set_result(None)


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime(settings: TasktreeSettings, name: str | None = None) -> WorkerRuntime:
    """This process's runtime, started on first use (so after any fork); `name` (the worker's hostname) names
    the process in unit ownership, traces and the fleet listing."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(settings, name=name)
        return _runtime

