"""What a run is to the people holding one: its state, progress, error and events (plain, typed values).

The record in Redis is a hash of strings (see runs.store); these models are what clients read from it.
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field, field_validator

from ..core.errors import TasktreeError
from ..core.redact import redact_text


class RunState(enum.StrEnum):
    """Where a run is in its life: queued -> running -> succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    #: Parked: nothing left but waits for signals (WaitFor); no process holds it until a signal or a deadline.
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in TERMINAL_STATES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})
ACTIVE_STATES = frozenset({RunState.QUEUED, RunState.RUNNING})
#: States a cancel applies to (a parked run is not active: no coordinator and no supervisor looks after it).
CANCELLABLE_STATES = ACTIVE_STATES | {RunState.WAITING}


class RunMode(enum.StrEnum):
    #: Submitted with RunClient.submit: coordinated in the fleet (a `tasktree.coordinate` task), resumed by
    #: replay on another coordinator when its own dies.
    SUBMITTED = "submitted"
    #: `await tree(context)` with a CeleryExecutor: coordinated by the calling process; if that process dies
    #: the run fails (its caller is gone) and `retry()` resumes it in the fleet.
    INLINE = "inline"


class RunError(BaseModel):
    """Why a run failed: the message, and where (node address, worker) when a unit was the cause."""

    message: str
    node: str | None = None
    worker: str | None = None

    @field_validator("message")
    @classmethod
    def _no_secrets(cls, message: str) -> str:
        """Run errors are shown to anyone who reads the run: a URL password in an exception is masked."""
        return redact_text(message)


class RunProgress(BaseModel):
    #: Units whose completion is recorded (OK or FAIL) / of them FAILed / units planned so far.
    done: int = 0
    failed: int = 0
    total: int = 0


class RunStatus(BaseModel):
    """A run's record as clients read it: state, progress, timings, tokens, cost, error, labels."""

    id: str
    tree: str
    state: RunState
    mode: RunMode = RunMode.SUBMITTED
    created_at: _dt.datetime
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None
    progress: RunProgress = Field(default_factory=RunProgress)
    error: RunError | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    #: Retries so far (0 for the first attempt).
    attempt: int = 0
    #: The process coordinating it now (host:pid:tag), if any.
    coordinator: str | None = None
    fingerprint: str = ""
    #: Totals over the run's units as recorded when it finished (None while running).
    cost_usd: float | None = None
    tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or _dt.datetime.now(_dt.UTC)
        return (end - self.started_at).total_seconds()


@dataclass(frozen=True)
class RunEvent:
    """One entry of a run's event stream; `id` is the stream id to resume reading after it."""

    id: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def time(self) -> _dt.datetime:
        """When Redis recorded it (stream ids start with milliseconds since the epoch)."""
        return _dt.datetime.fromtimestamp(int(self.id.split("-", 1)[0]) / 1000, _dt.UTC)


class RunNotFoundError(TasktreeError, LookupError):
    """No run has this id (never submitted, or its record expired after TASKTREE_RUN_RETENTION)."""


class SubmitError(TasktreeError, ValueError):
    """A run cannot be submitted (unregistered tree, fingerprint mismatch, unencodable blackboard...); nothing
    was queued."""


class RunQueryError(TasktreeError, ValueError):
    """A listing asked with a bad state, limit or cursor (the CLI exits 2, the web API answers 400)."""


class RunStateError(TasktreeError):
    """The operation does not apply to the run in its current state (e.g. retry of a running run)."""


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")


def check_run_id(run_id: str) -> str:
    """Run ids become parts of Redis keys and URLs: letters, digits and `_.:-`, at most 128, matched whole."""
    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        raise SubmitError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits or '_.:-', starting with a letter or digit"
        )
    return run_id
