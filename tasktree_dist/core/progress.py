"""Progress of fan-outs (Gather trees, Parallel children) for long runs: who is watching gets an event per child.

`Context(on_progress=callback)` calls `callback(event)` on the coordinator's loop each time a Gather tree or a
Parallel child finishes, in-process or on a worker alike. `rich_progress()` is a ready callback drawing one bar
per fan-out in the terminal.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .log import logger


@dataclass(frozen=True)
class ProgressEvent:
    #: The fan-out's node (e.g. `LLMBatch/Gather`) and which run of it (a node inside a loop runs many times).
    node: str
    run: int
    done: int
    total: int
    failed: int
    elapsed_s: float

    @property
    def finished(self) -> bool:
        return self.done >= self.total


ProgressCallback = Callable[[ProgressEvent], Any]


@dataclass
class ProgressCounter:
    """Counts one run of one fan-out and tells the context's callback; a no-op without a callback."""

    callback: ProgressCallback | None
    node: str
    total: int
    run: int = 0
    done: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    def start(self) -> ProgressCounter:
        self._tell()
        return self

    def child_done(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self._tell()

    def _tell(self) -> None:
        if self.callback is None:
            return
        event = ProgressEvent(self.node, self.run, self.done, self.total, self.failed, time.monotonic() - self.started)
        try:
            self.callback(event)
        except Exception:  # noqa: BLE001 - a broken progress display must not break the run
            logger.exception("progress callback %r failed; progress reporting stays off for %s", self.callback,
                             self.node)
            self.callback = None


_runs = itertools.count(1)


def progress_for(callback: ProgressCallback | None, node: str, total: int) -> ProgressCounter | None:
    """A counter for this run of the fan-out at `node` of `total` children (announced at 0 done); None when
    nobody watches (no callback), so fan-outs pay nothing."""
    if callback is None:
        return None
    return ProgressCounter(callback, node, total, next(_runs)).start()


@contextmanager
def rich_progress(min_children: int = 2, **progress_options: Any) -> Iterator[ProgressCallback]:
    """A progress callback drawing a rich bar per fan-out of at least `min_children` (done/total, failed, rate).

        with rich_progress() as on_progress:
            context = Context(executor=executor, on_progress=on_progress)
            ...
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars: dict[tuple[str, int], Any] = {}
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed[/red]"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
    )
    with Progress(*columns, **progress_options) as progress:

        def show(event: ProgressEvent) -> None:
            if event.total < min_children:
                return
            rate = f"{event.done / event.elapsed_s:.0f}/s" if event.elapsed_s > 0 and event.done else ""
            key = (event.node, event.run)
            bar = bars.get(key)
            if bar is None:
                bar = bars[key] = progress.add_task(event.node, total=event.total, failed=0, rate="")
            progress.update(bar, completed=event.done, failed=event.failed, rate=rate)

        yield show
