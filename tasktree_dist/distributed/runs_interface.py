"""What the coordinator side needs of runs, defined here and implemented by the runs package above.

Distributed execution keeps per-unit records and replays them, but runs (records, state, events, fleet coordinators)
sit above it. So this layer names the little it needs: a `RunLedger` for the run a top-level `await tree(context)`
drives (unit records to replay, counters, alerts, the watched drive), and a `RunsProvider` that opens ledgers and
serves the `tasktree.coordinate` task. `tasktree_dist` installs the runs package's provider at import (loaded on
first use, so a process that never coordinates never imports it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..core.errors import TasktreeError

if TYPE_CHECKING:
    from ..core.progress import ProgressEvent
    from ..core.result import Result
    from ..core.signals import Signal, WaitRequest
    from ..core.trace import TraceNode, TraceRoot
    from .protocol import Completion


#: How `offer` begins its answer for a run whose tree this process does not have (its message is handed back).
NOT_HERE = "cannot coordinate here"


class RunLedgerError(TasktreeError):
    """The run cannot be coordinated here (it belongs to another coordinator, or Redis refused it)."""


class RunLedger(Protocol):
    """One run as the executor and dispatcher live it."""

    run_id: str
    #: Units may have records from an earlier coordinator: read them before sending.
    replaying: bool
    replayed: int
    adopted: int
    planned: int
    #: The run's trace changed and should be written again.
    dirty: bool
    #: Why something outside the tree stopped it ("cancelled", "lost", "outage", "parked"), or None.
    stop_reason: str | None
    #: Fan-outs with units out, and a counter moved by every unit fan-out and wait: a run parks only when it has
    #: waits, no units out and a still counter. `parking` is set while a park is recorded: hold new units.
    units_out: int
    activity: int
    parking: asyncio.Future[None] | None

    async def unit_records(self, execution_ids: list[str]) -> list[bytes | None]:
        """The recorded completions of these units (None where a unit has none), in order."""
        ...

    def unit_alerts(self, completion: Completion, where: TraceNode) -> None:
        """Warnings and errors a unit's completion carries become run events."""
        ...

    def progress(self, event: ProgressEvent) -> None:
        """A fan-out advanced."""
        ...

    async def wait_for_signal(self, expected: Any, execution_id: str, request: WaitRequest) -> Signal | None:
        """A WaitFor reached in this run: its recorded answer, an early signal, a signal arriving on the reply list
        (`expected.expect(execution_id)` / `expected.forget(execution_id)`: the dispatcher) or its deadline (None);
        the run may park meanwhile."""
        ...

    async def drive(self, body: Callable[[], Awaitable[Result]], context: Any) -> Result:
        """Run the tree's body, watched (cancel, takeover, outage), and record how the run ended."""
        ...


class RunsProvider(Protocol):
    """The runs package, as distributed execution and the Celery tasks call it."""

    async def open_run(self, redis: Any, tree: Any, context: Any, root: TraceRoot, owner: str, reply: str,
                       settings: Any) -> RunLedger:
        """Attach to the record a fleet coordinator claimed for `context.run_id`, or record a new inline run."""
        ...

    def offer(self, app: Any, run_id: str) -> str:
        """`tasktree.coordinate`: coordinate a submitted run in this process if a slot is free; says what happened."""
        ...

    def outcome(self, app: Any, run_id: str, stop: threading.Event) -> str:
        """After an `offer` that started the run here: wait until this process stops coordinating it (or `stop` is
        set) and say how it ended; raise a TasktreeError when it failed (Flower shows the task failed)."""
        ...

    def worker_ready(self, app: Any, consumer: Any) -> None:
        """A worker started: coordinate and supervise runs if its consumer reads the runs queue."""
        ...


_provider: RunsProvider | None = None


def install_runs(provider: RunsProvider) -> None:
    global _provider
    _provider = provider


def runs_provider() -> RunsProvider:
    if _provider is None:
        raise TasktreeError("no runs provider is installed: import tasktree_dist (its package installs one)")
    return _provider
