"""Sending units and receiving their completions, for one coordinator event loop.

Units are sent in batches as concurrency slots free up; their blackboard snapshots are stored just before (so a
snapshot lives as long as the units that need it, however long the fan-out). Completions come back on one Redis
list per loop, drained by a single reader: thousands of units in flight cost a future each, no thread and no
blocking `.get()`. Each completion is handed to its fan-out as it arrives (`on_done`), exactly once.

A watchdog sends a unit again when the process that received it is gone (its heartbeat expired): received but
not started counts, so prefetched units of a dead worker come back too. When replaying a run (a coordinator took
it over, or it is retried), a unit whose completion is recorded is applied from the record without being sent,
and one still running on a live process is waited for, not sent again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kombu.utils.url import maybe_sanitize_url
from redis.exceptions import RedisError

from ..core.aio import reraise_if_cancelled
from ..core.errors import TasktreeError
from ..core.instruments import hooks as metrics
from ..core.log import logger
from ..core.progress import ProgressCounter
from ..core.redis_client import connect, mget, same_slot
from ..core.settings import TasktreeSettings
from . import keys
from .protocol import Completion, Unit
from .redis_retry import REDIS_ERRORS, retrying
from .replicas import replicas_for
from .routing import FleetView
from .runtime import REDIS_MAX_CONNECTIONS
from .scripts import RELEASE_OWNER, SET_EACH

if TYPE_CHECKING:
    from .runs_interface import RunLedger

#: Most units in one message, whatever the batch size setting: a message stays small for the broker.
MESSAGE_MAX_UNITS = 256


class DispatchError(TasktreeError):
    """Work that cannot be shipped (unregistered tree, unencodable blackboard...); the node FAILs with this."""


@dataclass(eq=False)
class InFlight:
    """A unit sent and not yet answered: what the reader resolves and the watchdog sends again."""

    unit: Unit
    payload: bytes
    future: asyncio.Future[Completion]
    #: Processes that died holding it (their heartbeat expired).
    lost: list[str] = field(default_factory=list)
    sent: bool = False
    sent_at: float = 0.0
    #: Its completion was handed to the fan-out (exactly once, whichever way it came).
    applied: bool = False
    #: Since when (monotonic) no live process could run it (routing.FleetView); None while one can.
    unrunnable_since: float | None = None


@dataclass(eq=False)
class Expected:
    """A completion expected on the reply list without a unit sent for it (a wait's signal): never sent again."""

    future: asyncio.Future[Completion]
    sent: bool = False
    applied: bool = False


@dataclass
class Prepared:
    """A unit ready to go, with its snapshot's bytes (stored just before sending)."""

    unit: Unit
    payload: bytes


class Dispatcher:
    """Per event loop: the Redis client, this loop's reply list, and the units waiting on it."""

    def __init__(
        self,
        settings: TasktreeSettings,
        broker_url: str,
        publish: Callable[[list[Unit]], None],
        sender: concurrent.futures.Executor,
    ) -> None:
        self.settings = settings
        self.broker_url = broker_url
        self._publish = publish
        self._sender = sender
        # a blocking pool: hundreds of concurrent dispatches wait for a connection instead of failing
        self.redis = connect(settings.redis_url, asynchronous=True, max_connections=REDIS_MAX_CONNECTIONS)
        self._release_owner = self.redis.register_script(RELEASE_OWNER)
        self._set_each = self.redis.register_script(SET_EACH)
        self.fleet = FleetView(self.redis)
        self.reply_key = keys.reply(uuid.uuid4().hex)
        self.inflight: dict[str, InFlight] = {}
        self.reader: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None
        #: Until when the watchdog judges nobody dead: after Redis trouble heartbeats may have lapsed for everyone.
        self._grace_until = 0.0
        #: Units sent before this time and still unowned once the grace is over may have been lost with a broker
        #: connection during the trouble: they are sent again (a copy still queued is skipped at admission).
        self._suspect_before = 0.0
        self._snapshots_refreshed = time.monotonic()
        self._broker_worked = False
        #: Fleet processes seen dead (None until the first look: those dead before we started are not news).
        self._dead: set[str] | None = None
        self._redis_worked = False
        metrics.track_dispatcher(self, settings)

    # -- sending ----------------------------------------------------------------------------------------------
    async def run_units(
        self,
        scope: RunLedger,
        count: int,
        prepare: Callable[[int], Prepared],
        limit: int,
        on_done: Callable[[int, Completion], None],
        progress: ProgressCounter | None = None,
        batch_size: int = 16,
    ) -> None:
        """Run `count` units (made by `prepare(i)` when their turn comes), at most `limit` running; `on_done(i,
        completion)` as each arrives. If the caller stops waiting (Timeout, cancel), the units still out are
        cancelled on their workers and what arrived before stays applied.

        With more units than the limit, up to TASKTREE_DISPATCH_LOOKAHEAD x `limit` more are out, waiting on the
        workers for a slot of the fan-out's gate (distributed.gates): a freed slot is refilled on its worker."""
        loop = asyncio.get_running_loop()
        lookahead = 0
        if count > limit and self.settings.dispatch_lookahead > 0:
            lookahead = min(count - limit, math.ceil(limit * self.settings.dispatch_lookahead))
        gate: str | None = None  # named after the fan-out's first unit: a coordinator replaying it finds its slots
        slots = asyncio.Semaphore(limit + lookahead)
        outstanding: dict[int, InFlight] = {}
        #: Units whose batched calls are out (batch mode): no worker holds them, their continuation waits.
        parked: dict[int, InFlight] = {}
        resuming: set[asyncio.Task[None]] = set()
        ready: list[InFlight] = []  # continuations resumed together, sent together
        all_done: asyncio.Future[None] = loop.create_future()
        remaining = count
        sending = True
        busy = True  # counted in scope.units_out: units out on workers, or more to send
        closed = False

        def settle_busy() -> None:
            """A fan-out whose only unfinished units are parked on batches lets its run park (units_out)."""
            nonlocal busy
            now = sending or bool(outstanding) or not parked
            if closed:
                return
            if now != busy:
                busy = now
                scope.units_out += 1 if busy else -1
                scope.activity += 1

        def finished(index: int, entry: InFlight, future: asyncio.Future[Completion]) -> None:
            nonlocal remaining
            slots.release()
            if outstanding.get(index) is entry:
                outstanding.pop(index)
            if future.cancelled() or all_done.done() or entry.applied:
                settle_busy()
                return
            entry.applied = True
            completion = future.result()
            if completion.awaiting:  # its batched calls are out: wait for them (the run may park), then continue
                parked[index] = entry
                task = loop.create_task(resume(index, entry, completion.awaiting))
                resuming.add(task)
                task.add_done_callback(resuming.discard)
                settle_busy()
                return
            if entry.lost:
                completion.extra.update(dispatches=entry.unit.dispatch, lost_workers=entry.lost)
            try:
                on_done(index, completion)
                if progress is not None:
                    progress.child_done(completion.ok)
            except Exception as exc:  # noqa: BLE001 - surfaces in the waiting fan-out, not in the loop's log
                all_done.set_exception(exc)
                return
            remaining -= 1
            settle_busy()
            if remaining == 0:
                all_done.set_result(None)

        def track(index: int, entry: InFlight) -> None:
            entry.future.add_done_callback(lambda f, i=index, e=entry: finished(i, e, f))
            outstanding[index] = entry
            self.inflight[entry.unit.execution_id] = entry

        async def resume(index: int, entry: InFlight, custom_ids: list[str]) -> None:
            """Wait for a unit's batched calls (durable waits named after them), then send its continuation."""
            try:
                continuation = await self._await_batched(scope, entry.unit, custom_ids)
                await slots.acquire()
                if scope.parking is not None:
                    await asyncio.shield(scope.parking)
                if scope.stop_reason is not None:
                    slots.release()
                    return
                resumed = InFlight(continuation, entry.payload, loop.create_future(), list(entry.lost))
                parked.pop(index, None)
                track(index, resumed)
                settle_busy()
                self.ensure_tasks()
                ready.append(resumed)
                if len(ready) == 1:  # the first of a burst sends what resumed with it (one message, not one each)
                    await asyncio.sleep(0)
                    while ready:
                        burst, ready[:] = ready[:MESSAGE_MAX_UNITS], ready[MESSAGE_MAX_UNITS:]
                        await self._dispatch(scope, burst)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the fan-out fails naming it, as a dispatch error does
                if not all_done.done():
                    all_done.set_exception(exc)

        most = max(1, min(batch_size, limit // 4, MESSAGE_MAX_UNITS))
        # units waiting on the workers keep the slots busy meanwhile: the next message waits to go out full (a
        # message costs the fleet about as much as the units in it), not one per completion read
        fill = max(1, min(most, lookahead))
        scope.units_out += 1  # a fan-out in progress: the run does not park (the runs package parks runs)
        scope.activity += 1
        try:
            index = 0
            while index < count:
                await slots.acquire()
                taken = 1
                await asyncio.sleep(0)  # completions resolved in this burst free their slots first
                while taken < min(fill, count - index):
                    await slots.acquire()
                    taken += 1
                while taken < most and index + taken < count and not slots.locked():
                    await slots.acquire()  # free: returns at once
                    taken += 1
                if scope.parking is not None:  # the run is parking: if it does, this task is cancelled here
                    await asyncio.shield(scope.parking)
                if scope.stop_reason is not None:  # stopped from outside: nothing more is made or sent
                    raise asyncio.CancelledError
                batch = []
                for i in range(index, index + taken):
                    prepared = prepare(i)
                    if lookahead:
                        gate = gate or hashlib.sha1(prepared.unit.execution_id.encode()).hexdigest()[:20]
                        prepared.unit.gate, prepared.unit.gate_limit = gate, limit
                    entry = InFlight(prepared.unit, prepared.payload, loop.create_future())
                    track(i, entry)
                    batch.append(entry)
                index += taken
                self.ensure_tasks()  # after registering: the reader and watchdog stop when nothing is in flight
                await self._dispatch(scope, batch)
            sending = False
            settle_busy()
            if count:
                await all_done
        except BaseException:
            if not all_done.done():
                all_done.cancel()  # from here on, only salvage applies completions
            for task in list(resuming):
                task.cancel()
            unfinished = list(outstanding.values())
            for entry in unfinished:
                self.inflight.pop(entry.unit.execution_id, None)
            try:
                await self._salvage(scope, outstanding, on_done)
            finally:
                await self.abandon([entry.unit for entry in unfinished])
                for entry in unfinished:
                    entry.future.cancel()
            raise
        finally:
            closed = True
            if busy:
                scope.units_out -= 1
            scope.activity += 1

    async def _await_batched(self, scope: RunLedger, unit: Unit, custom_ids: list[str]) -> Unit:
        """A unit's batched calls are out: wait for each (a durable wait `batch:<custom id>`, signalled when its
        batch is read; the run parks meanwhile if nothing else is live) and return the unit's continuation, which
        applies their answers. A wait that times out (TASKTREE_LLM_BATCH_TTL_S) lets the continuation go too: it
        treats the call as unanswered (batch_fallback)."""
        from ..core.signals import PayloadSchema, WaitRequest
        from ..llm.batch import get_batch_queue
        from ..llm.batch_park import wait_name

        get_batch_queue(self.settings.redis_url).ensure_supervising()  # someone polls even if the adders died
        origin = unit.batch_origin or unit.execution_id
        schema = PayloadSchema()

        async def one(custom_id: str) -> None:
            request = WaitRequest(wait_name(custom_id), unit.where, schema, {"batched_call": custom_id},
                                  float(self.settings.llm_batch_ttl_s), has_default=True)
            # thousands of calls parking at once queue for the loop's Redis connections (the pool gives up after
            # 20 s, seen with 10,000 at load 10): a refused registration is tried again, not the fan-out failed
            delay, give_up = 0.2, time.monotonic() + self.settings.redis_outage_limit
            while True:
                try:
                    await scope.wait_for_signal(self, f"{origin}:{wait_name(custom_id)}", request)
                    return
                except (OSError, RedisError) as exc:
                    if time.monotonic() + delay > give_up:
                        raise
                    logger.warning("batched call %s: registering its wait failed (%s: %s); retrying", custom_id,
                                   type(exc).__name__, exc)
                    await asyncio.sleep(delay)  # back-off, not synchronisation
                    delay = min(delay * 2, 2.0)

        await asyncio.gather(*(one(custom_id) for custom_id in custom_ids))
        round_ = unit.batch_round + 1
        return unit.model_copy(update={
            "execution_id": f"{origin}~b{round_}", "batch_origin": origin, "batch_round": round_, "dispatch": 1,
            "batch_awaited": sorted({*(unit.batch_awaited or ()), *custom_ids}),
        })

    async def _salvage(
        self, scope: RunLedger, outstanding: dict[int, InFlight], on_done: Callable[[int, Completion], None]
    ) -> None:
        """The fan-out is being stopped: apply the completions recorded by now but not read yet (finished in the
        moments before the stop), so everything that finished before it is kept."""
        arrived = {i: e.future.result() for i, e in outstanding.items()
                   if not e.applied and e.future.done() and not e.future.cancelled()}
        arrived = {i: c for i, c in arrived.items() if not c.awaiting}  # parked on batches: nothing to apply
        waiting = {i: e for i, e in outstanding.items() if e.sent and not e.applied and i not in arrived}
        if waiting:
            try:
                records = await scope.unit_records([e.unit.execution_id for e in waiting.values()])
            except Exception as exc:  # noqa: BLE001 - best effort: the records stay for a retry
                logger.warning("run %s: reading finished units at stop failed: %s", scope.run_id, exc)
                records = [None] * len(waiting)
            for index, record in zip(waiting, records, strict=True):
                if record is not None:
                    try:
                        completion = Completion.from_record(record)
                    except ValueError:
                        continue
                    if not completion.awaiting:  # parked on batches: its continuation is not out yet
                        arrived[index] = completion
        for index, completion in sorted(arrived.items()):
            outstanding[index].applied = True
            try:
                on_done(index, completion)
            except Exception as exc:  # noqa: BLE001 - one bad completion must not lose the others
                logger.warning("run %s: a finished unit was not applied at stop: %s", scope.run_id, exc)

    async def _dispatch(self, scope: RunLedger, batch: list[InFlight]) -> None:
        """Skip what a replay finds done or running, store the snapshots of the rest (and of units adopted from a
        previous coordinator: sent again if their worker dies), send the rest. A resumed run replaying its units
        writes no snapshot for them."""
        pending = [entry for entry in batch if not entry.future.done()]
        if scope.replaying and pending:
            pending = await self._replayed(scope, pending)
        needed = {entry.unit.snapshot: entry.payload for entry in batch if not entry.future.done()}
        if needed:
            await self._store_snapshots(needed)
        if pending:
            now = time.time()
            for entry in pending:
                entry.sent, entry.sent_at = True, now
            await self.send([entry.unit for entry in pending])

    async def _replayed(self, scope: RunLedger, batch: list[InFlight]) -> list[InFlight]:
        """Resolve units whose completion is recorded; keep waiting for units a live process holds; return the
        rest (to be sent)."""
        ids = [entry.unit.execution_id for entry in batch]
        records = await scope.unit_records(ids)
        owners = await mget(self.redis, [keys.owner(entry.unit.run_id, entry.unit.execution_id) for entry in batch])
        alive = await self._alive({owner for owner in owners if owner is not None})
        to_send = []
        for entry, record, owner in zip(batch, records, owners, strict=True):
            if record is not None:
                try:
                    self.resolve(Completion.from_record(record))
                    scope.replayed += 1
                    continue
                except ValueError as exc:
                    logger.warning("unit %s: unreadable record, running it again: %s", entry.unit.where, exc)
            if owner is not None and owner in alive:
                entry.sent = True  # still running where the previous coordinator sent it: its answer comes here
                entry.sent_at = time.time()
                scope.adopted += 1
                continue
            if owner is not None:  # it was running on a process that died with the previous coordinator
                entry.lost.append(owner.decode(errors="replace"))
                entry.unit.dispatch += 1
            to_send.append(entry)
        return to_send

    async def _store_snapshots(self, payloads: dict[str, bytes]) -> None:
        async def store() -> None:
            # acknowledged by a replica: a unit sent with a snapshot that a failover lost could not run; one call
            # per slot on a Cluster (snapshot keys carry their run's tag), one call on a single Redis
            await asyncio.gather(*(
                replicas_for(self.redis, self.settings).run(
                    self._set_each, keys=group, args=[self.settings.snapshot_ttl, "", *(payloads[k] for k in group)])
                for group in same_slot(self.redis, payloads, str)))

        try:
            # a blip is ridden out; Redis that never answered fails the node at once, naming it
            await retrying(store, "storing blackboard snapshots",
                           self.settings.redis_outage_limit if self._redis_worked else 0.5)
            self._redis_worked = True
        except (*REDIS_ERRORS, RedisError) as exc:
            raise DispatchError(
                f"cannot store blackboard snapshots in Redis {maybe_sanitize_url(self.settings.redis_url)} "
                f"(TASKTREE_REDIS_URL): {type(exc).__name__}: {exc}"
            ) from exc

    async def send(self, units: list[Unit]) -> None:
        """Publish units (grouped by queue) from the sender thread; a broker blip is ridden out, a broker that never
        answered fails the node at once, naming it."""
        by_queue: dict[str, list[Unit]] = {}
        for unit in units:
            by_queue.setdefault(unit.queue, []).append(unit)
        loop = asyncio.get_running_loop()
        for group in by_queue.values():
            delay, give_up = 0.1, time.monotonic() + (self.settings.redis_outage_limit if self._broker_worked else 0)
            while True:
                try:
                    await loop.run_in_executor(self._sender, self._publish, group)
                    self._broker_worked = True
                    metrics.units_sent(group)
                    break
                except Exception as exc:
                    reraise_if_cancelled()
                    metrics.broker_error()
                    if time.monotonic() + delay > give_up:
                        broker = maybe_sanitize_url(self.broker_url)
                        raise DispatchError(
                            f"cannot send {len(group)} unit(s) ({group[0].where}...) to the broker {broker} "
                            f"(TASKTREE_BROKER_URL), queue {group[0].queue!r}: {type(exc).__name__}: {exc}"
                        ) from exc
                    logger.warning("sending units failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
                    await asyncio.sleep(delay)  # back-off, not synchronisation
                    delay = min(delay * 2, 2.0)

    async def abandon(self, units: list[Unit]) -> None:
        """The coordinator stopped waiting (Timeout, Terminable, cancellation): tell workers to drop these units."""
        for unit in units:
            self.inflight.pop(unit.execution_id, None)
        if not units:
            return
        pipe = self.redis.pipeline(transaction=False)
        for unit in units:
            pipe.set(keys.cancel(unit.run_id, unit.execution_id), 1, ex=self.settings.reply_ttl)
        try:
            await asyncio.shield(pipe.execute())
        except Exception:  # noqa: BLE001 - best effort: a late unit's completion is ignored anyway
            pass

    # -- waits ------------------------------------------------------------------------------------------------
    def expect(self, execution_id: str) -> asyncio.Future[Completion]:
        """A future resolved when a completion for `execution_id` arrives on this loop's reply list (a signal
        answering a WaitFor comes this way); `forget` it when done."""
        entry = Expected(asyncio.get_running_loop().create_future())
        self.inflight[execution_id] = entry  # type: ignore[assignment]
        self.ensure_tasks()
        return entry.future

    def forget(self, execution_id: str) -> None:
        entry = self.inflight.get(execution_id)
        if isinstance(entry, Expected):
            del self.inflight[execution_id]
            if not entry.future.done():
                entry.future.cancel()

    # -- receiving --------------------------------------------------------------------------------------------
    def resolve(self, completion: Completion) -> None:
        entry = self.inflight.pop(completion.execution_id, None)
        if entry is not None and not entry.future.done():
            entry.future.set_result(completion)

    def ensure_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self.reader is None or self.reader.done():
            self.reader = loop.create_task(self._read(), name="tasktree-completions")
        if self.watchdog is None or self.watchdog.done():
            self.watchdog = loop.create_task(self._watch(), name="tasktree-watchdog")

    async def _read(self) -> None:
        """Resolve futures from the reply list; exits as soon as nothing is pending (restarted on demand)."""
        redis = self.redis
        while self.inflight:
            try:
                item = await redis.blpop([self.reply_key], timeout=1)
                if item is None:
                    continue
                raws = [item[1], *(await redis.lpop(self.reply_key, 1000) or [])]
            except (OSError, RedisError) as exc:  # a Redis blip must not orphan every unit in flight
                reraise_if_cancelled()
                self._trouble()
                logger.warning("reading completions failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(0.2)  # back-off, not synchronisation
                continue
            for raw in raws:
                try:
                    completion = Completion.from_record(raw)
                except ValueError as exc:  # a foreign or corrupt message must not stop the reader for every unit
                    logger.error("ignoring an unreadable completion on %s: %s: %.200r", self.reply_key, exc, raw)
                    continue
                self.resolve(completion)

    async def _alive(self, processes: set[bytes]) -> set[bytes]:
        if not processes:
            return set()
        ordered = sorted(processes)
        pipe = self.redis.pipeline(transaction=False)
        for process in ordered:
            pipe.exists(keys.heartbeat(process.decode(errors="replace")))
        return {process for process, alive in zip(ordered, await pipe.execute(), strict=True) if alive}

    async def _watch(self) -> None:
        """Send again the units whose owner process died: received (prefetched or running), owner's heartbeat
        gone. When a fleet process dies, units sent before its death that nobody owns are sent again too: a
        broker such as Redis hands a message to a worker (BRPOP) before the worker can record it, so one may be
        lost with the process. (A copy still queued is answered from the record or skipped at admission.)
        Also keeps the snapshots of units still waiting alive."""
        period = min(1.0, self.settings.lease_ttl / 3)
        while self.inflight:
            await asyncio.sleep(period)  # a polling period, not synchronisation
            entries = [entry for entry in self.inflight.values() if entry.sent]
            if not entries:
                continue
            try:
                await self._refresh_snapshots(entries)
                if time.monotonic() >= self._grace_until:
                    await self._fail_unrunnable(entries)
                newly_dead = await self._newly_dead_processes()
                if not self._dead and not self._suspect_before:
                    continue  # every fleet process is alive: no unit can have a dead owner (one MGET saved a second)
                owners = await mget(self.redis, [keys.owner(entry.unit.run_id, entry.unit.execution_id)
                                                  for entry in entries])
                alive = await self._alive({owner for owner in owners if owner is not None})
            except (OSError, RedisError) as exc:
                reraise_if_cancelled()
                self._trouble()
                logger.warning("checking unit owners failed (%s: %s)", type(exc).__name__, exc)
                continue
            if time.monotonic() < self._grace_until:
                continue
            suspect_before, self._suspect_before = self._suspect_before, 0.0
            for entry, owner in zip(entries, owners, strict=True):
                if entry.future.done():
                    continue
                if owner is not None and owner not in alive:
                    dead = owner.decode(errors="replace")
                elif owner is None and newly_dead and entry.sent_at < time.time() - period:
                    dead = f"{'/'.join(sorted(newly_dead))} (in transit)"
                elif owner is None and entry.sent_at <= suspect_before:
                    dead = "(in transit during a Redis outage)"
                else:
                    continue
                try:
                    await self._redispatch(entry, dead)
                except (OSError, RedisError, DispatchError) as exc:  # checked again next period
                    logger.warning("sending unit %s again failed: %s", entry.unit.where, exc)

    async def _fail_unrunnable(self, entries: list[InFlight]) -> None:
        """FAIL the units no live process can run (no live worker of their queue has their tree at their
        fingerprint), naming the live processes: at the second look when live workers serve the queue (they hand
        the units back), after TASKTREE_UNRUNNABLE_LIMIT seconds when none does (workers restarting, heartbeats
        lapsed in a Redis blip)."""
        now = time.monotonic()
        verdicts: dict[tuple[str, str, str], tuple[str | None, float]] = {}
        given_up = []
        for entry in entries:
            unit = entry.unit
            if entry.future.done():
                continue
            route = (unit.queue, unit.tree, unit.fingerprint)
            if route not in verdicts:
                why = await self.fleet.why_not(*route)
                served = why is not None and await self.fleet.served(unit.queue)
                verdicts[route] = why, 0.0 if served else self.settings.unrunnable_limit
            why, limit = verdicts[route]
            if why is None:
                entry.unrunnable_since = None
            elif entry.unrunnable_since is None:
                entry.unrunnable_since = now
                if limit:
                    logger.warning("unit %s: %s; waiting up to %.0f s (TASKTREE_UNRUNNABLE_LIMIT)", unit.where, why,
                                   limit)
            elif now - entry.unrunnable_since >= limit:
                given_up.append(unit)
                waited = f"; waited {limit:.0f} s (TASKTREE_UNRUNNABLE_LIMIT)" if limit else ""
                self.resolve(Completion(execution_id=unit.execution_id, status="FAIL", queue=unit.queue,
                                        error=f"unit {unit.where}: {why}{waited}"))
        if given_up:
            metrics.units_unrunnable(given_up)
            await self.abandon(given_up)  # a worker still handing it back drops it

    def _trouble(self) -> None:
        metrics.redis_error()
        self._grace_until = time.monotonic() + self.settings.lease_ttl
        self._suspect_before = time.time()

    async def _newly_dead_processes(self) -> set[str]:
        """Fleet processes whose heartbeat expired since the last look (a clean stop leaves the fleet listing; a
        killed process stays listed without a heartbeat)."""
        listed = [p.decode(errors="replace") for p in
                  await self.redis.zrangebyscore(keys.PROCESSES, time.time() - 3600, "+inf")]
        if not listed:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for process in listed:
            pipe.exists(keys.heartbeat(process))
        dead = {process for process, alive in zip(listed, await pipe.execute(), strict=True) if not alive}
        first_look = self._dead is None
        new, self._dead = dead - (self._dead or set()), dead
        return set() if first_look else new

    async def _refresh_snapshots(self, entries: list[InFlight]) -> None:
        if time.monotonic() - self._snapshots_refreshed < self.settings.snapshot_ttl / 4:
            return
        self._snapshots_refreshed = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        for name in {entry.unit.snapshot for entry in entries}:
            pipe.expire(name, self.settings.snapshot_ttl)
        await pipe.execute()

    async def _redispatch(self, entry: InFlight, dead: str) -> None:
        unit = entry.unit
        metrics.unit_lost(unit.tree, dead, unit.dispatch >= self.settings.max_dispatches)
        if dead not in entry.lost:
            entry.lost.append(dead)
        if unit.dispatch >= self.settings.max_dispatches:
            self.resolve(Completion(  # run_units adds dispatches and lost_workers, as for any re-sent unit
                execution_id=unit.execution_id, status="FAIL", queue=unit.queue,
                error=f"unit {unit.where}: the processes holding it died ({', '.join(entry.lost)}: heartbeat "
                f"expired); sent {unit.dispatch} times, giving up "
                f"(TASKTREE_MAX_DISPATCHES={self.settings.max_dispatches})",
            ))
            return
        logger.warning("unit %s: process %s holding it died (heartbeat expired); sending it again", unit.where, dead)
        await self._release_owner(keys=[keys.owner(unit.run_id, unit.execution_id)], args=[dead])
        await self._store_snapshots({unit.snapshot: entry.payload})
        unit.dispatch += 1
        entry.sent_at = time.time()
        await self.send([unit])

    async def aclose(self) -> None:
        tasks = [task for task in (self.reader, self.watchdog) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.redis.delete(self.reply_key)
        except (OSError, RedisError) as exc:  # Redis is down: the reply list expires by its TTL
            logger.warning("could not delete %s: %s", self.reply_key, exc)
        await self.redis.aclose()
