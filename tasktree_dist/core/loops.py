"""Per-event-loop resources (clients bound to a loop) closed when their loop shuts down, for code that never
closes them itself.

asyncio.run() (and pytest-asyncio) finish every async generator started on a loop, inside that loop, before
closing it (loop.shutdown_asyncgens()): a generator parked at its `yield` whose `finally` awaits the close runs
there, while the loop can still run it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


class CloseWithTheLoop:
    """Runs `close()` (a coroutine function acting on the running loop) when a registered loop shuts down."""

    def __init__(self, close: Callable[[], Awaitable[Any]]) -> None:
        self._close = close
        self._closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def register(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call on the running `loop`, once per loop (when its first resource is made)."""
        agen = self._closer()
        step = agen.asend(None)  # the first step registers the generator with the running loop
        try:
            step.send(None)  # runs it to its `yield` without awaiting anything
        except StopIteration:
            self._closers[loop] = agen  # the loop only keeps a weak reference
        else:  # pragma: no cover - cannot happen: nothing is awaited before the yield
            step.close()

    async def forget(self) -> None:
        """The running loop's resources were closed explicitly: nothing is left to do at its shutdown."""
        agen = self._closers.pop(asyncio.get_running_loop(), None)
        if agen is not None:
            await agen.aclose()

    async def _closer(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self._closers.pop(asyncio.get_running_loop(), None)
            await self._close()
