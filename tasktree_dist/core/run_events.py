"""Typed events a node adds to its run's event stream as they happen (an agent's turns, messages and tool calls).

Nodes know nothing of Redis: the process that runs units installs a sink (distributed.runtime: the run's Redis
stream, capped, with the run's retention). Without a sink or a run id (a plain in-process run) an event is only
logged in the node's trace, at debug level, so nothing is lost from view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .log import logger

#: (run_id, event type, data) -> written to the run's stream.
EventSink = Callable[[str, str, dict[str, Any]], Awaitable[None]]

_sink: tuple[EventSink, asyncio.AbstractEventLoop | None] | None = None


def set_event_sink(sink: EventSink | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Install the sink for this process (`loop`: the loop its client belongs to; events of other loops skip it)."""
    global _sink
    _sink = (sink, loop) if sink is not None else None


async def emit(context: Any, tracer: Any, kind: str, data: dict[str, Any]) -> None:
    """Add an event to the run of `context`; a failing sink is logged, never fails the node."""
    if tracer is not None:
        tracer.log(f"{kind} {data}", "debug")
    run_id = getattr(context, "run_id", None)
    if _sink is None or not run_id:
        return
    sink, loop = _sink
    if loop is not None and loop is not asyncio.get_running_loop():
        return
    try:
        await sink(run_id, kind, data)
    except Exception as exc:  # noqa: BLE001 - an event is worth less than the work it describes
        logger.warning("run %s: event %s not written: %s: %s", run_id, kind, type(exc).__name__, exc)
