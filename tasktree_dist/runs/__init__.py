"""Runs: the durable unit users submit, watch, cancel and retry (records, events, fleet coordinators, replay).

`from tasktree_dist.runs import RunClient` (or `from tasktree_dist import RunClient`).
"""

from .audit import AuditEntry, AuditLog
from .client import Run, RunClient, RunList
from .model import (
    RunError,
    RunEvent,
    RunMode,
    RunNotFoundError,
    RunProgress,
    RunQueryError,
    RunState,
    RunStateError,
    RunStatus,
    SubmitError,
)

__all__ = [
    "AuditEntry",
    "AuditLog",
    "Run",
    "RunClient",
    "RunError",
    "RunEvent",
    "RunList",
    "RunMode",
    "RunNotFoundError",
    "RunProgress",
    "RunQueryError",
    "RunState",
    "RunStateError",
    "RunStatus",
    "SubmitError",
]
