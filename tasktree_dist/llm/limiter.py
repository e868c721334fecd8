"""The Redis side of flow control: one limiter per (event loop, Redis URL), shared by every LLM call on the loop.

Why batching: a redis.asyncio script call costs about 0.1 ms of client CPU, as much as the whole LLM node. Every
operation a loop issues in one iteration (admissions, corrections, releases, pauses, lease renewals) therefore
goes to Redis in one script call (limiter_script.py), the way the worker runtime publishes completions: with a
hundred calls in flight, flow control costs a few microseconds per call.

Slots and budget reservations are leases: the process renews them every lease/3 while its calls run; a process
that dies stops renewing and they come back within the lease. A waiter sleeps as long as the script says
(never a tight poll), and wakes early when a call of its own process on the same waiting room finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import urllib.parse
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core.log import logger
from ..core.loops import CloseWithTheLoop
from ..core.redis_client import connect
from .limiter_script import SCRIPT
from .limits import KEY_PREFIX

#: Most operations in one script call: bounds how long one call occupies the Redis server.
MAX_BATCH = 256
#: Waiters wake on multiples of this (loop clock): those due within it ask Redis in one script call.
WAKE_QUANTUM_S = 0.025


class FlowError(Exception):
    """Flow control could not admit a call: Redis unreachable, or a call that can never fit a limit."""


class Cooling(FlowError):
    """The deployment a routed call was about to use is paused (cooling down, llm.routing): go elsewhere."""


def budget_key(run_id: str) -> str:
    return f"{KEY_PREFIX}budget:{run_id}"


def masked(url: str) -> str:
    """The URL with its password hidden, for error messages."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class KeyIndex:
    """The KEYS of one script call: each scope's (run budget's) key once, operations refer to it by position."""

    __slots__ = ("keys", "_at")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._at: dict[str, int] = {}

    def place(self, key: str) -> int:
        at = self._at.get(key)
        if at is None:
            self.keys.append(key)
            at = self._at[key] = len(self.keys)
        return at

    scope = budget = place


#: Builds one operation's JSON object once the batch's keys are known.
OpBuilder = Callable[[KeyIndex], dict[str, Any]]


@dataclass
class Lease:
    """What a running call holds and this process renews: concurrency slots and a budget reservation."""

    slots: list[str] = field(default_factory=list)
    budget: str | None = None


class Limiter:
    """Batches flow-control operations into script calls; renews leases; wakes local waiters."""

    def __init__(self, url: str, lease_s: float) -> None:
        self.url = url
        self.lease_s = lease_s
        self.redis = connect(url, asynchronous=True)
        self._script = self.redis.register_script(SCRIPT)
        self._queue: list[tuple[OpBuilder, asyncio.Future[Any] | None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._leases: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._sleepers: dict[str, dict[asyncio.Future[None], int]] = {}

    # -- operations -------------------------------------------------------------------------------------------
    def submit(self, build: OpBuilder, answer: bool = True) -> asyncio.Future[Any] | None:
        """Queue an operation for this iteration's script call; its result comes on the future (`answer`)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future() if answer else None
        self._queue.append((build, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return future

    async def call(self, build: OpBuilder) -> Any:
        future = self.submit(build)
        assert future is not None
        return await future

    async def _flush(self) -> None:
        while self._queue:
            await asyncio.sleep(0)  # one loop iteration: operations issued together share the script call
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            index = KeyIndex()
            try:
                ops = orjson.dumps([build(index) for build, _ in batch])
                results = orjson.loads(await self._script(keys=index.keys, args=[ops]))
            except Exception as exc:  # noqa: BLE001 - each caller hears about it; nothing else may stop the flusher
                error = FlowError(
                    f"LLM flow control: Redis {masked(self.url)} (TASKTREE_REDIS_URL) failed: {type(exc).__name__}: "
                    f"{exc}"
                )
                unanswered = sum(1 for _, future in batch if future is None)
                if unanswered:
                    logger.warning("%s; %d corrections/releases lost (their leases and windows expire)",
                                   error, unanswered)
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future is not None and not future.done():
                    future.set_result(result)

    # -- leases -----------------------------------------------------------------------------------------------
    def hold(self, member: str, lease: Lease) -> None:
        """Renew `member`'s slots and reservation from now on, until `release`."""
        self._leases[member] = lease
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    def release(self, member: str) -> None:
        self._leases.pop(member, None)

    async def _renew(self) -> None:
        lease_ms = int(self.lease_s * 1000)
        while self._leases:
            await asyncio.sleep(self.lease_s / 3)  # a renewal period, not synchronisation
            held = list(self._leases.items())
            if not held:
                break

            def build(index: KeyIndex, held: list[tuple[str, Lease]] = held) -> dict[str, Any]:
                slots = [[index.scope(base), member] for member, lease in held for base in lease.slots]
                budgets = [[index.budget(lease.budget), member] for member, lease in held if lease.budget]
                return {"o": "r", "c": slots, "z": budgets, "l": lease_ms}

            with contextlib.suppress(FlowError):  # the next period tries again; a lease has two periods of slack
                await self.call(build)

    # -- waiting ----------------------------------------------------------------------------------------------
    async def sleep(self, room: str, seconds: float, position: int) -> None:
        """Sleep `seconds` (rounded up to the next WAKE_QUANTUM_S of the loop's clock, so waiters due about together
        wake together and share a script call), or less when a call of this process leaves waiting room `room`
        (see `wake`)."""
        loop = asyncio.get_running_loop()
        sleeper: asyncio.Future[None] = loop.create_future()
        timer = loop.call_at(math.ceil((loop.time() + seconds) / WAKE_QUANTUM_S) * WAKE_QUANTUM_S, _wake, sleeper)
        waiting = self._sleepers.setdefault(room, {})
        waiting[sleeper] = position
        try:
            await sleeper
        finally:
            timer.cancel()
            waiting.pop(sleeper, None)
            if not waiting:
                self._sleepers.pop(room, None)

    def wake(self, room: str, count: int = 1) -> None:
        """A call in `room` finished: its capacity may be free now; the local waiters nearest the front look."""
        waiting = self._sleepers.get(room)
        if waiting:
            for sleeper in sorted(waiting, key=waiting.__getitem__)[:count]:
                _wake(sleeper)

    async def aclose(self) -> None:
        for task in (self._flusher, self._renewer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.redis.aclose()


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Limiter]] = weakref.WeakKeyDictionary()


def get_limiter(url: str, lease_s: float) -> Limiter:
    """The running loop's limiter for `url`, made on first use (redis.asyncio clients are bound to a loop) and
    closed when the loop shuts down."""
    loop = asyncio.get_running_loop()
    by_url = _limiters.get(loop)
    if by_url is None:
        by_url = _limiters[loop] = {}
        _close_with_the_loop.register(loop)
    limiter = by_url.get(url)
    if limiter is None:
        limiter = by_url[url] = Limiter(url, lease_s)
    return limiter


async def close_limiters() -> None:
    """Close the running loop's limiters (tests, the end of a script; otherwise the loop's shutdown does)."""
    for limiter in _limiters.pop(asyncio.get_running_loop(), {}).values():
        await limiter.aclose()
    await _close_with_the_loop.forget()


_close_with_the_loop = CloseWithTheLoop(close_limiters)
