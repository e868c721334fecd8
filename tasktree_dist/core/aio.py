"""asyncio helpers the library's long-running loops share."""

from __future__ import annotations

import asyncio


def reraise_if_cancelled() -> None:
    """Raise CancelledError if the running task has been asked to stop.

    Call it first in an `except Exception` of a loop that must stop when cancelled: a client library can turn the
    CancelledError delivered inside one of its awaits into another error (redis-py does, mid-command), and a loop
    that swallowed it would run forever while its canceller waits (seen: a run's final write never came).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
