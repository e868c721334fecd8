"""Riding out Redis blips: which errors mean "Redis is away for now" and a back-off loop around one operation.

Shared by the worker runtime, the dispatcher and the run client (which must not import the worker to know them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.aio import reraise_if_cancelled
from ..core.instruments import hooks as metrics
from ..core.log import logger

T = TypeVar("T")

#: Errors that mean Redis cannot be reached right now (restarting, failing over, a network blip).
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


async def retrying(attempt: Callable[[], Awaitable[T]], what: str, outage_s: float = 60.0) -> T:
    """Run `attempt` until Redis answers, backing off, for at most `outage_s`: a blip must not lose a unit."""
    delay, give_up = 0.05, time.monotonic() + outage_s
    while True:
        try:
            return await attempt()
        except REDIS_ERRORS as exc:
            reraise_if_cancelled()
            if time.monotonic() + delay > give_up:
                raise
            metrics.redis_error()
            logger.warning("%s: Redis unavailable (%s: %s); retrying in %.2f s", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)  # back-off, not synchronisation
            delay = min(delay * 2, 2.0)
