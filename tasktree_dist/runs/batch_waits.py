"""Batch mode's calls resume their runs (llm.batch_park.BatchListener): when a batch is read, each answered
call's wait (`batch:<custom id>`) is signalled in its run, as a person's signal answers a WaitFor: a parked run is
queued again and resumed by replay, a running one hears of it on its coordinator's reply list."""

from __future__ import annotations

import asyncio
from typing import Any

from ..core.log import logger
from ..core.settings import get_settings
from ..core.signals import Signal
from ..llm.batch_park import wait_name
from .store import store_for


class BatchWaits:
    """Signals the waits of batched calls whose outcome is recorded (the signal id is the custom id: a call
    signalled twice, by a poller that died midway and the one that took over, is recorded once)."""

    async def calls_answered(self, redis: Any, answers: list[tuple[str, str, dict[str, Any]]]) -> None:
        book = store_for(redis, get_settings()).waits

        async def one(run_id: str, custom_id: str, summary: dict[str, Any]) -> None:
            kind, detail = await book.signal(run_id, Signal(wait_name(custom_id), summary, custom_id), True)
            if kind == "missing":
                logger.warning("batched call %s answered, but its run %s has expired", custom_id, run_id)
            elif kind == "woke":
                logger.info("run %s: its batched calls are answered; resuming it", run_id)

        await asyncio.gather(*(one(*answer) for answer in answers))
