"""A run as its coordinator lives it: around a top-level `await tree(context)` with a distributed executor.

Opening the scope creates the run's record (an inline run: this process coordinates it) or attaches to the
record a fleet coordinator just claimed. While the tree runs, a watcher reads the record twice a second: a
cancel from any process stops the tree (its remote units stop on their workers), and so does losing the run to
another coordinator (this one stalled past its heartbeat) or Redis staying away longer than the outage limit.
Progress events and the trace are written to Redis as the run goes; at the end the result, final blackboard,
totals and state are written in one atomic transition (guarded by ownership, so a run is never both cancelled
and succeeded and a stale coordinator never overwrites its successor).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from ..core.aio import reraise_if_cancelled
from ..core.instruments import hooks as metrics
from ..core.log import logger
from ..core.progress import ProgressEvent
from ..core.result import Result, Status
from ..core.serde import EncodingError, dump_chunks
from ..core.trace import fragment_alerts
from ..distributed import keys
from ..distributed.runs_interface import RunLedgerError
from . import store as store_module
from .model import RunError, RunMode, RunState
from .store import RunStore, store_for
from .waits import catalogue_field, wait_in_run

if TYPE_CHECKING:
    from ..core.settings import TasktreeSettings
    from ..core.signals import Signal, WaitRequest
    from ..core.trace import TraceNode, TraceRoot
    from ..distributed.protocol import Completion

#: How often the coordinator reads its run's record (cancel, ownership) and writes pending events.
WATCH_S = 0.5
EVENTS_S = 0.25
#: A stopped run whose tree is still running this long after the stop is cancelled again.
RESTOP_S = 2.0
#: How long the end of a run waits for its watcher and event writer to stop.
HELPERS_STOP_S = 2.0
#: How long a run's caller waits for its end to be recorded before that continues in the background.
FINISH_WAIT_S = 5.0
#: Final writes still retrying after their run returned (kept referenced until done).
_background: set[asyncio.Future[None]] = set()
#: Most events waiting to be written (a storm of warnings must not grow memory without bound).
MAX_PENDING_EVENTS = 10_000
#: A running run's trace is rewritten at most every TRACE_WRITE_SHARE x the time one write took.
TRACE_WRITE_SHARE = 20
#: A run whose only remaining work is waits parks once that has held this long (two looks: a branch between two
#: of its units is not mistaken for a finished one; a run parked wrongly would only resume by replay).
PARK_QUIET_S = 0.1
#: Least time between two progress events of one fan-out (the first and last are always written).
PROGRESS_EVERY_S = 0.5


class RunScopeError(RunLedgerError):
    """The run cannot be coordinated here (it belongs to another coordinator, or Redis refused it)."""


async def stored_json(store: RunStore, run_id: str, name: str, value: Any, where: str) -> bytes | str:
    """A record field's value: `value` serde-encoded, stored a megabyte at a time when large (a 100,000-item result
    never exists whole in memory; see RunStore.put_payload), or b"" when it cannot be encoded (logged, not fatal)."""
    try:
        return await store.put_payload(run_id, name, dump_chunks(value, where, store_module.BIG_FIELD_BYTES))
    except (EncodingError, TypeError) as exc:
        logger.warning("run record: %s not stored: %s", where, exc)
        return b""


def first_error(root: TraceNode) -> RunError | None:
    """Where a failed run went wrong: the deepest-first node with an error, with its path and worker."""
    for node in root.walk():
        error = node.attributes.get("error")
        if error:
            holder: TraceNode | None = node  # the unit (an ancestor) carries the worker that ran it
            while holder is not None and not holder.attributes.get("worker"):
                holder = holder.parent
            worker = holder.attributes["worker"] if holder is not None else None
            return RunError(message=str(error), node="/".join(node.path[1:]), worker=worker)
    return None


class RunScope:
    """A run as its coordinator lives it (distributed.runs_interface.RunLedger): replay records, events, the
    watched drive and the recorded end."""

    def __init__(
        self,
        run_id: str,
        store: RunStore,
        owner: str,
        epoch: int,
        mode: RunMode,
        replaying: bool,
        root: TraceRoot,
        settings: TasktreeSettings,
    ) -> None:
        self.run_id = run_id
        self.store = store
        self.owner = owner
        self.epoch = epoch
        self.mode = mode
        self.replaying = replaying
        self.root = root
        self.settings = settings
        #: Units planned so far (fan-out sizes and single units), applied from records, adopted while running.
        self.planned = 0
        self.replayed = 0
        self.adopted = 0
        #: Set when something outside the tree stopped it: "cancelled", "lost" (another coordinator owns the
        #: run now) or "outage" (Redis away longer than TASKTREE_REDIS_OUTAGE_LIMIT).
        self.stop_reason: str | None = None
        self._stopped_at = 0.0
        self.dirty = True
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._progress_sent: dict[tuple[str, int], float] = {}
        #: Waits of this run pending here (execution id -> request), fan-outs with units out, and a counter that
        #: moves whenever either changes: a run parks when it has waits, no units out and a still counter.
        self.waits: dict[str, WaitRequest] = {}
        self.units_out = 0
        self.activity = 0
        #: Set while a park is being recorded: fan-outs hold their next units until it is decided.
        self.parking: asyncio.Future[None] | None = None
        self._task: asyncio.Future[Result] | None = None
        self._parker: asyncio.Future[None] | None = None

    # -- opening ----------------------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        store: RunStore,
        tree: Any,
        context: Any,
        root: TraceRoot,
        owner: str,
        reply: str,
        settings: TasktreeSettings,
    ) -> RunScope:
        """Attach to the record a fleet coordinator claimed for `context.run_id`, or record a new inline run."""
        run_id = context.run_id
        if run_id is not None:
            record = await store.record(run_id)
            if record is not None:
                if record.get("owner") != owner:
                    if record.get("closing") == owner:  # our claim was stopped from outside before we opened it:
                        await store.let_go(run_id, owner)  # there is no final write to wait for
                    raise RunScopeError(
                        f"run {run_id} is {record.get('state')} and coordinated by {record.get('owner') or 'nobody'}, "
                        "not by this process: use a new run id, or RunClient.retry() for a finished run"
                    )
                if record.get("reply") != reply:
                    await store.set_fields(run_id, {"reply": reply})
                if not record.get("waitdefs"):  # what a signal is checked against by processes without the tree
                    await store.set_fields(run_id, {"waitdefs": catalogue_field(tree)})
                epoch, attempt = int(record.get("epoch") or 1), int(record.get("attempt") or 0)
                return cls(run_id, store, owner, epoch, RunMode(record.get("mode") or RunMode.SUBMITTED.value),
                           epoch > 1 or attempt > 0, root, settings)
        else:
            run_id = context.run_id = uuid.uuid4().hex
        blackboard = await stored_json(store, run_id, "blackboard", context.blackboard, "blackboard")
        fields = {
            "tree": tree.name, "fingerprint": tree.fingerprint, "mode": RunMode.INLINE.value, "reply": reply,
            "labels": "{}", "blackboard": blackboard, "waitdefs": catalogue_field(tree),
        }
        if not await store.create(run_id, RunState.RUNNING, fields, owner=owner):
            raise RunScopeError(f"run {run_id} already exists: use a new run id")
        return cls(run_id, store, owner, 1, RunMode.INLINE, False, root, settings)

    @classmethod
    async def open_on(cls, redis: Any, tree: Any, context: Any, root: TraceRoot, owner: str, reply: str,
                      settings: TasktreeSettings) -> RunScope:
        """`open` on the run store of a redis.asyncio client (the dispatcher's)."""
        return await cls.open(store_for(redis, settings), tree, context, root, owner, reply, settings)

    async def wait_for_signal(self, expected: Any, execution_id: str, request: WaitRequest) -> Signal | None:
        return await wait_in_run(self, self.store.waits, expected, execution_id, request)

    async def unit_records(self, execution_ids: list[str]) -> list[bytes | None]:
        return await self.store.unit_records(self.run_id, execution_ids)

    # -- while running ----------------------------------------------------------------------------------------
    async def drive(self, body: Callable[[], Awaitable[Result]], context: Any) -> Result:
        """Run the tree, watched; record how it ended. Returns the tree's result (FAIL if stopped from outside)."""
        self.root.trace_id = self.run_id
        self.root.on_alert = self.alert
        task = self._task = asyncio.ensure_future(body())
        helpers = [asyncio.ensure_future(self._watch(task)), asyncio.ensure_future(self._write_events())]
        caller_cancelled = False
        try:
            try:
                result = await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self.stop_reason is None or (current is not None and current.cancelling()):
                    caller_cancelled = True
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise
                result = Result(Status.FAIL, None)
                if self.stop_reason != "parked":
                    self.root.log(self._stop_message(), "warning")
                    self.root.set_end(result)
        finally:
            if self._parker is not None:
                helpers.append(self._parker)
            for helper in helpers:
                helper.cancel()
            # bounded: a helper that swallowed its cancellation (a client library may) must not hold the run
            await asyncio.wait(helpers, timeout=HELPERS_STOP_S)
            if caller_cancelled:
                self.stop_reason = self.stop_reason or "caller"
                self.root.set_end(Result(Status.FAIL, None))
                await asyncio.shield(self._finish(Result(Status.FAIL, None), context))
        if self.stop_reason == "parked":
            try:
                await self._flush_events()
            except Exception as exc:  # noqa: BLE001 - events only: the park itself is recorded
                logger.warning("run %s: writing events at park failed: %s", self.run_id, exc)
            return result
        await self._finish(result, context)
        return result

    # -- parking ----------------------------------------------------------------------------------------------
    def wake_parker(self) -> None:
        """A wait is pending: a submitted run may park (an inline run's caller holds it, so it waits in place)."""
        if self.mode == RunMode.SUBMITTED and (self._parker is None or self._parker.done()):
            self._parker = asyncio.ensure_future(self._park_when_idle())

    async def _park_when_idle(self) -> None:
        seen = -1
        while self.waits and self._task is not None and not self._task.done() and self.stop_reason is None:
            await asyncio.sleep(PARK_QUIET_S)  # a quiet period, not synchronisation (see PARK_QUIET_S)
            if self.units_out or not self.waits:
                seen = -1
            elif self.activity != seen:
                seen = self.activity
            elif await self._park():
                return
            else:
                seen = -1

    async def _park(self) -> bool:
        """Record the park (atomically, if every wait held here is still pending) and let the run go: its task is
        cancelled, the coordinator slot freed. True when parked, or when the run is no longer ours to park."""
        self.parking = asyncio.get_running_loop().create_future()
        try:
            await self._flush_events()
            await self._write_trace()
            deadlines = [r.deadline for r in self.waits.values() if r.deadline is not None]
            kind, detail = await self.store.waits.park(self.run_id, self.owner, self.epoch,
                                                       min(deadlines) if deadlines else None, list(self.waits))
        except Exception as exc:  # noqa: BLE001 - not parked: the run keeps waiting here and tries again
            reraise_if_cancelled()
            logger.warning("run %s: parking failed (%s: %s)", self.run_id, type(exc).__name__, exc)
            return False
        finally:
            parking, self.parking = self.parking, None
            if not parking.done():
                parking.set_result(None)
        if kind == "ok":
            logger.info("run %s: parked on %d wait(s); slot released", self.run_id, len(self.waits))
            await self.store.compact_events(self.run_id)  # parked for hours or days: its events in what they need
            self.stop_reason = "parked"
            if self._task is not None:
                self._task.cancel()
            return True
        return kind != "answered"  # state/owner: the watcher stops the run; answered: it goes on

    def _stop_message(self) -> str:
        return {
            "cancelled": f"run {self.run_id} was cancelled",
            "lost": f"run {self.run_id} is coordinated elsewhere now (this coordinator lost it)",
            "outage": f"Redis was unreachable for over {self.settings.redis_outage_limit:g} s "
                      "(TASKTREE_REDIS_OUTAGE_LIMIT); the run stopped",
            "caller": f"run {self.run_id} was cancelled by the process that started it",
            "parked": f"run {self.run_id} parked: it waits for signals, holding no process",
        }.get(self.stop_reason or "", "stopped")

    async def _watch(self, task: asyncio.Future[Result]) -> None:
        failing_since: float | None = None
        name = keys.run(self.run_id)
        while not task.done():
            reraise_if_cancelled()
            await asyncio.sleep(WATCH_S)  # a polling period, not synchronisation
            try:
                state, owner, epoch = await self.store.redis.hmget(name, "state", "owner", "epoch")
            except Exception as exc:  # noqa: BLE001 - Redis away: the run waits up to the outage limit
                reraise_if_cancelled()
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.settings.redis_outage_limit:
                    self._stop(task, "outage")
                    return
                logger.warning("run %s: reading its record failed (%s: %s)", self.run_id, type(exc).__name__, exc)
                continue
            failing_since = None
            if state == b"cancelled":
                self._stop(task, "cancelled")
            elif state is None or (owner or b"").decode() != self.owner or int(epoch or 0) != self.epoch:
                self._stop(task, "lost")

    def _stop(self, task: asyncio.Future[Result], reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._stopped_at = time.monotonic()
            logger.warning(self._stop_message())
            task.cancel()
        elif not task.done() and time.monotonic() - self._stopped_at > RESTOP_S:
            # the cancellation was swallowed on the way (a client library may turn it into its own error): again
            logger.warning("run %s: still running %.1f s after it was stopped; cancelling it again", self.run_id,
                           time.monotonic() - self._stopped_at)
            self._stopped_at = time.monotonic()
            task.cancel()

    def progress(self, event: ProgressEvent) -> None:
        """A fan-out's progress: into the run's events (at most every PROGRESS_EVERY_S per fan-out)."""
        key = (event.node, event.run)
        now = time.monotonic()
        if event.done and not event.finished and now - self._progress_sent.get(key, 0.0) < PROGRESS_EVERY_S:
            return
        self._progress_sent[key] = now
        if event.finished:
            self._progress_sent.pop(key, None)
        self._events.append(("progress", {"node": event.node, "run": event.run, "done": event.done,
                                          "total": event.total, "failed": event.failed,
                                          "elapsed_s": round(event.elapsed_s, 3)}))

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self._events.append((kind, data))

    def alert(self, node: TraceNode, level: str, message: str, path: str | None = None) -> None:
        """A warning or error logged in the run's trace: into its events (the trace keeps every log). A park
        cancels the run's task here on purpose: its nodes' "cancelled" is no news."""
        if len(self._events) < MAX_PENDING_EVENTS and self.stop_reason != "parked":
            self._events.append(("log", {"node": path or "/".join(node.path[1:]), "level": level,
                                         "message": message[:2000]}))

    def unit_alerts(self, completion: Completion, where: TraceNode) -> None:
        """The warnings and errors a worker logged in a unit, as events at the unit's place: from its trace
        fragment, or from the alerts a slim reply carries instead (a child of a large fan-out)."""
        alerts = fragment_alerts(completion.trace) if completion.trace else completion.alerts
        if alerts:
            prefix = "/".join(where.path[1:-1])
            for path, level, message in alerts:
                self.alert(where, level, message, f"{prefix}/{path}" if prefix else path)

    async def _write_events(self) -> None:
        next_trace = 0.0
        while True:
            reraise_if_cancelled()
            await asyncio.sleep(EVENTS_S)  # a writing period, not synchronisation
            try:
                await self._flush_events()
                if self.dirty and time.monotonic() >= next_trace:
                    self.dirty = False
                    started = time.monotonic()
                    await self._write_trace()
                    # a large trace is written less often: its writes take at most 1/TRACE_WRITE_SHARE of the loop
                    spent = time.monotonic() - started
                    next_trace = started + max(self.settings.trace_flush_s, spent * TRACE_WRITE_SHARE)
            except Exception as exc:  # noqa: BLE001 - written again next period
                reraise_if_cancelled()
                logger.warning("run %s: writing events/trace failed (%s: %s)", self.run_id, type(exc).__name__, exc)

    async def _flush_events(self) -> None:
        if self._events:
            events, self._events = self._events, []
            await self.store.emit_many(self.run_id, events)

    async def _write_trace(self) -> None:
        await self.store.write_trace(self.run_id, orjson.dumps(self.root.json()))
        await self.store.set_fields(self.run_id, {"total": self.planned})

    # -- the end ----------------------------------------------------------------------------------------------
    async def _finish(self, result: Result, context: Any) -> None:
        """Record the outcome. If Redis is away, the caller gets its result anyway and the record is written in
        the background once Redis answers again (for up to an hour): a run must not stay 'running'."""
        if self.stop_reason == "lost":
            logger.warning("run %s: not recording its end here: another coordinator owns it", self.run_id)
            return
        try:
            await asyncio.wait_for(self._record_end(result, context), FINISH_WAIT_S)
            await self.store.compact_events(self.run_id)  # the run is kept for days: its events in what they need
            return
        except Exception as exc:  # noqa: BLE001 - Redis away or slow: keep trying without holding the caller
            logger.warning("run %s: recording its end failed (%s: %s); retrying in the background", self.run_id,
                           type(exc).__name__, exc)
        task = asyncio.ensure_future(self._record_end_eventually(result, context))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _record_end_eventually(self, result: Result, context: Any) -> None:
        delay, deadline = 0.2, time.monotonic() + max(3600.0, self.settings.redis_outage_limit)
        while True:
            await asyncio.sleep(delay)  # back-off, not synchronisation
            try:
                await self._record_end(result, context)
                logger.warning("run %s: its end is recorded now", self.run_id)
                return
            except Exception as exc:  # noqa: BLE001 - keep trying: a run must end as finished in its record
                reraise_if_cancelled()
                if time.monotonic() > deadline:
                    logger.error("run %s: giving up recording its end: %s", self.run_id, exc)
                    return
                delay = min(delay * 2, 5.0)

    async def _record_end(self, result: Result, context: Any) -> None:
        await self._flush_events()
        await self._write_trace()
        tokens = self.root.total_tokens().get("total", 0)
        fields = {
            "result": await stored_json(self.store, self.run_id, "result", result, "result"),
            "final_blackboard": await stored_json(self.store, self.run_id, "final_blackboard", context.blackboard,
                                                  "final blackboard"),
            "cost_usd": repr(self.root.total_cost()), "tokens": str(tokens), "total": str(self.planned),
            "closing": "",
        }
        stats = {"replayed_units": self.replayed, "adopted_units": self.adopted} if self.replaying else {}
        if self.stop_reason in ("cancelled", "caller"):
            error = RunError(message=self._stop_message())
            outcome = await self.store.transition(
                self.run_id, (RunState.RUNNING, RunState.CANCELLED), RunState.CANCELLED,
                event={"error": error.message, **stats}, fields={**fields, "error": error.model_dump_json()},
            )
            if outcome.ok and outcome.detail == RunState.CANCELLED.value:
                metrics.run_state(RunState.CANCELLED)  # cancelled by a client (RunClient, CLI): count it here,
                # in the fleet process whose metrics are scraped, not only in the short-lived client
            await self._count_end(RunState.CANCELLED, tokens)
            return
        ok = result.is_ok()
        error = None
        if not ok:
            error = RunError(message=self._stop_message()) if self.stop_reason else (
                first_error(self.root) or RunError(message="the tree returned FAIL", node=self.root.name))
            fields["error"] = error.model_dump_json()
        to = RunState.SUCCEEDED if ok else RunState.FAILED
        event = {**stats, **({"error": error.message, "node": error.node} if error else {})}
        outcome = await self.store.transition(self.run_id, (RunState.RUNNING,), to, owner=self.owner,
                                              event=event, fields=fields)
        if not outcome.ok and outcome.detail == RunState.CANCELLED.value:
            # cancelled between the tree's end and this write: the cancel wins, the outcome is kept
            await self.store.transition(self.run_id, (RunState.CANCELLED,), RunState.CANCELLED, fields=fields)
            metrics.run_state(RunState.CANCELLED)
            await self._count_end(RunState.CANCELLED, tokens)
        elif not outcome.ok:
            logger.warning("run %s: end not recorded (%s: %s)", self.run_id, outcome.reason, outcome.detail)
        else:
            await self._count_end(to, tokens)

    async def _count_end(self, state: RunState, tokens: int) -> None:
        """Per-tree run metrics (count, duration from the recorded start, cost, tokens), once per recorded end."""
        try:
            tree, started = await self.store.redis.hmget(keys.run(self.run_id), "tree", "started_at")
        except Exception:  # noqa: BLE001 - metrics are best effort
            return
        name = tree.decode(errors="replace") if isinstance(tree, bytes) else str(tree or "?")
        try:
            seconds = time.time() - float(started) if started else None
        except ValueError:
            seconds = None
        metrics.run_finished(name, state, seconds, self.root.total_cost(), int(tokens or 0))
