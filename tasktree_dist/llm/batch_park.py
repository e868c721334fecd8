"""Parking a batched call: what the LLM node, the worker running its unit and the runs package share.

A batched call in a unit of a distributed run is added to its batch and then *not* waited for: the node raises
BatchPending, the unit ends "awaiting" the call's custom id (the worker's slot is free at once), the run's
coordinator waits on a durable wait named `batch:<custom id>` (the run parks when nothing else is live), and the
batch poller, once it has recorded the call's outcome, signals that wait through the BatchListener the runs
package installs (llm sits below runs: it names what it needs here). The coordinator then sends the unit again as
its continuation, which finds the outcome recorded and applies it as a live call's answer (tools run there).

BatchPending is a core.errors.UnitParks (a BaseException) on purpose: a node's "exceptions become FAIL" contract
must not turn a parked call into a FAIL that a Selector or Retry around it would act on; it unwinds the unit like a
cancellation does, except that a fan-out in the unit lets its other branches run first (they join the same
batches, one round for all of them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core.errors import UnitParks

#: A batched call's wait is named this + its custom id.
WAIT_PREFIX = "batch:"


def wait_name(custom_id: str) -> str:
    return f"{WAIT_PREFIX}{custom_id}"


class BatchPending(UnitParks):
    """The unit's batched calls are out: end the unit "awaiting" them (see the module docstring)."""

    def __init__(self, custom_ids: list[str]) -> None:
        super().__init__(f"awaiting batched calls {', '.join(custom_ids)}")
        self.custom_ids = custom_ids


@dataclass
class Parking:
    """A unit that may park its batched calls: the custom ids its coordinator already waited for (their outcome
    is recorded, or their wait timed out: they never park again) and those parked by this run of the unit."""

    awaited: frozenset[str] = frozenset()
    pending: list[str] = field(default_factory=list)


_parking: ContextVar[Parking | None] = ContextVar("tasktree_batch_parking", default=None)


def parking() -> Parking | None:
    """The running unit's Parking, None where a batched call must wait in place (outside a worker's unit)."""
    return _parking.get()


@contextlib.contextmanager
def parkable(awaited: list[str] | None) -> Iterator[Parking]:
    """Run a unit (on a worker) whose batched calls park instead of waiting (tasks it starts inherit it)."""
    state = Parking(frozenset(awaited or ()))
    token = _parking.set(state)
    try:
        yield state
    finally:
        _parking.reset(token)


class BatchListener(Protocol):
    """Resumes the runs whose batched calls are answered (runs.batch_waits implements it)."""

    async def calls_answered(self, redis: Any, answers: list[tuple[str, str, dict[str, Any]]]) -> None:
        """(run id, custom id, summary) of calls whose outcome is recorded: signal each run's wait for the call.
        Idempotent: a call signalled twice (a poller that died midway, taken over) is recorded once."""
        ...


_listener: BatchListener | None = None


def install_batch_listener(listener: BatchListener | None) -> None:
    global _listener
    _listener = listener


def batch_listener() -> BatchListener | None:
    return _listener
