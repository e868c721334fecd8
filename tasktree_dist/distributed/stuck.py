"""A worker whose event loop stops answering exits, so whatever supervises the process (compose's `restart:`,
systemd, Kubernetes) starts a fresh one.

Every unit of a worker process runs on its one event loop; user code that blocks it (a `time.sleep`, a CPU loop, a
synchronous HTTP call inside an async Function) stalls every unit of the process, and the heartbeat, renewed by a
thread of its own, keeps the stalled units owned forever. A watchdog thread posts a no-op to the loop every quarter
of TASKTREE_STUCK_LOOP_S; when none has run for TASKTREE_STUCK_LOOP_S it logs the loop thread's stack (the
blocking code) and ends the process with EXIT_STUCK. Its heartbeat then lapses and its units are sent again
(lease rules), its runs taken over by replay.

While the loop answers, the watchdog also touches TASKTREE_HEALTH_FILE (when set): a container health probe is a
shell `find` on its age, with no Python process started per probe (one took 2.3 s wall, 1.7 s CPU every 15 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

from ..core.log import logger

#: The exit status of a worker that ended itself because its loop was stuck (EX_SOFTWARE).
EXIT_STUCK = 70
#: Longest time between two looks at the loop (and touches of the health file).
HEALTH_PERIOD_S = 10.0


def thread_stack(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(thread gone)"


def exit_now() -> None:
    for handler in logging.getLogger().handlers + logger.handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    sys.stderr.flush()
    os._exit(EXIT_STUCK)  # the loop cannot be stopped cleanly: it is the thing that is stuck


class LoopWatchdog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: threading.Thread,
        limit_s: float,
        name: str = "",
        on_stuck: Callable[[], None] = exit_now,
        health_file: str = "",
    ) -> None:
        self.loop = loop
        self.loop_thread = loop_thread
        self.limit_s = limit_s
        self.name = name
        self.on_stuck = on_stuck
        self.health_file = health_file
        self.answered = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tasktree-loop-watchdog", daemon=True)

    def start(self) -> LoopWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _touch(self) -> None:
        try:
            with open(self.health_file, "a"):
                os.utime(self.health_file)
        except OSError as exc:
            logger.warning("cannot touch TASKTREE_HEALTH_FILE %s: %s", self.health_file, exc)
            self.health_file = ""  # said once; the probe will say the rest

    def _answer(self) -> None:
        self.answered = time.monotonic()

    def _watch(self) -> None:
        period = max(0.05, min(self.limit_s / 4, HEALTH_PERIOD_S))
        while not self._stop.wait(period):  # a polling period, not synchronisation
            if self.loop.is_closed():
                return
            self.loop.call_soon_threadsafe(self._answer)
            silent = time.monotonic() - self.answered
            if self.health_file and silent <= 2 * period:
                self._touch()
            if silent > self.limit_s:
                logger.critical(
                    "the event loop of worker %s has not answered for %.1f s (TASKTREE_STUCK_LOOP_S=%s): code on it "
                    "blocks (use `await asyncio.sleep`, an async client, or a sync Function, which runs in a thread); "
                    "exiting with status %d so the process is restarted and its units sent again. The loop thread "
                    "is here:\n%s", self.name or os.getpid(), silent, self.limit_s, EXIT_STUCK,
                    thread_stack(self.loop_thread))
                self.on_stuck()
                return
