"""A fan-out's concurrency limit held on the workers (its slot gate), so a freed slot is refilled where it was freed.

A fan-out with more units than its concurrency limit sends up to TASKTREE_DISPATCH_LOOKAHEAD x limit units beyond
the limit (distributed.dispatch) and tags each with its gate. A worker runs such a unit only while the unit holds
one of the gate's slots: a Redis set of the execution ids holding one (keys.gate), never more than the limit.
When a unit ends, its worker hands its slot to the next unit of the same gate waiting in this process: that unit
starts at once, and the hand-over is recorded with the completion (scripts.PUBLISH), with no round trip through
the coordinator. With none waiting here the slot is released, and the units waiting on every worker take free
slots as their process polls the gates (TASKTREE_GATE_POLL_S, one script call for all of them).

A slot belongs to an execution id, not to a process: a unit sent again after its worker died finds its slot still
held and runs at once, and its completion releases it, as every completion does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from itertools import islice

from ..core.aio import reraise_if_cancelled
from ..core.errors import TasktreeError
from ..core.log import logger
from . import keys
from .protocol import Unit
from .redis_retry import REDIS_ERRORS
from .scripts import WorkerScripts


class GateError(TasktreeError):
    """A unit's fan-out slot could not be asked for (Redis refused the script): the unit FAILs with it."""


#: Most units of one gate asking again in one poll (the oldest): hundreds waiting need not all ask each time.
REASK_MAX = 32


@dataclass(eq=False)
class Waiter:
    """A unit of this process waiting for a slot of its gate."""

    execution_id: str
    granted: asyncio.Future[None]
    #: It asked before (so it holds no slot from an earlier delivery: only a first ask looks for one).
    asked: bool = False


@dataclass(eq=False)
class Queue:
    """One gate's units waiting in this process, oldest first, and the gate's limit."""

    limit: int
    waiters: deque[Waiter]


def gate_key(unit: Unit) -> str:
    """The unit's slot gate, '' when it has none."""
    return keys.gate(unit.run_id, unit.gate) if unit.gate else ""


class SlotGates:
    """The slot gates of one worker process's loop: who waits here, who holds a slot here."""

    def __init__(self, scripts: WorkerScripts, ttl: int, period: float) -> None:
        self._scripts = scripts
        self._ttl = ttl
        self._period = period
        self._waiting: dict[str, Queue] = {}
        #: Execution ids holding a slot in this process (granted here; released or handed on when they end).
        self._held: set[str] = set()
        self._poller: asyncio.Task[None] | None = None
        #: Units of this process waiting for a slot (read by the heartbeat's thread: a plain int).
        self.waiting = 0

    async def take(self, unit: Unit) -> None:
        """Return once `unit` holds a slot of its gate (cancelling the caller gives up its place)."""
        key = gate_key(unit)
        waiter = Waiter(unit.execution_id, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(key, Queue(max(1, unit.gate_limit), deque())).waiters.append(waiter)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="tasktree-gates")
        self.waiting += 1
        try:
            await waiter.granted
        finally:
            self.waiting -= 1

    def hand_on(self, unit: Unit) -> str:
        """`unit` ends: its slot goes to the oldest unit of its gate waiting here, which starts now; returns that
        unit's execution id, or '' when the slot is released (the completion records either)."""
        if unit.execution_id not in self._held:
            return ""
        self._held.discard(unit.execution_id)
        queue = self._waiting.get(gate_key(unit))
        while queue is not None and queue.waiters:
            waiter = queue.waiters.popleft()
            if not waiter.granted.done():
                self._grant(waiter)
                return waiter.execution_id
        return ""

    def _grant(self, waiter: Waiter) -> None:
        self._held.add(waiter.execution_id)
        waiter.granted.set_result(None)

    async def _poll(self) -> None:
        """Ask for slots for every unit waiting here: at once (a message's units ask together), then every period
        while any still waits."""
        await asyncio.sleep(0)  # one loop iteration: the units admitted with this one ask in the same call
        period = self._period
        while True:
            asks = []
            for key in list(self._waiting):
                pending = self._to_ask(self._waiting[key].waiters)
                if pending:
                    asks.append((key, pending))
                else:
                    del self._waiting[key]
            if not asks:
                return
            try:
                flags = await self._scripts.claim(
                    [(key, self._waiting[key].limit, [w.execution_id for w in pending], sum(w.asked for w in pending))
                     for key, pending in asks], self._ttl)
                for _, pending in asks:
                    for waiter in pending:
                        waiter.asked = True
                period = self._period
            except REDIS_ERRORS as exc:
                reraise_if_cancelled()
                if period == self._period:  # once per outage, not at every ask
                    logger.warning("asking for fan-out slots failed (%s: %s); asking again", type(exc).__name__, exc)
                period = min(2 * period, 1.0)  # back-off while Redis is away
                flags = []
            except Exception as exc:  # noqa: BLE001 - a refused script: these units FAIL naming it, never hang
                reraise_if_cancelled()
                error = GateError(f"asking for a slot of fan-out gate {asks[0][0]} failed: "
                                  f"{type(exc).__name__}: {exc}")
                logger.error("%s (%d units waiting here FAIL)", error, sum(len(p) for _, p in asks))
                for _, pending in asks:
                    for waiter in pending:
                        if not waiter.granted.done():
                            waiter.granted.set_exception(error)
                flags = []
            granted = iter(flags)
            for key, pending in asks:
                for waiter in pending:
                    if not next(granted, False):
                        continue
                    if not waiter.granted.done():
                        self._grant(waiter)
                    elif waiter.execution_id not in self._held:
                        # it stopped while asking, or took a slot handed on here and ended meanwhile: whichever
                        # of its release and this grant Redis saw first, the slot must not stay taken
                        await self._give_back(key, waiter.execution_id)
            await asyncio.sleep(period)  # a polling period, not synchronisation

    @staticmethod
    def _to_ask(queue: deque[Waiter]) -> list[Waiter]:
        """Of one gate's waiting units, those asking now: the oldest that asked before (a few: slots free up a few
        at a time), then every new one (a first ask also finds a slot held from an earlier delivery). New ones are
        at the end of the queue; units granted or stopped are dropped from its front."""
        while queue and queue[0].granted.done():
            queue.popleft()
        again = list(islice((w for w in queue if w.asked and not w.granted.done()), REASK_MAX))
        fresh = []
        for waiter in reversed(queue):
            if waiter.asked:
                break
            if not waiter.granted.done():
                fresh.append(waiter)
        return again + fresh[::-1]

    async def _give_back(self, key: str, execution_id: str) -> None:
        try:
            await self._scripts.release(key, execution_id)
        except REDIS_ERRORS as exc:  # the gate keeps it until the gate expires (TASKTREE_REPLY_TTL)
            reraise_if_cancelled()
            logger.warning("releasing a fan-out slot of %s failed: %s", execution_id, exc)
