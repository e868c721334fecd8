"""Exception types: programming errors surface at build time, everything else becomes a FAIL result."""


class TasktreeError(Exception):
    """Base class of every error tasktree_dist raises on purpose."""


class TasktreeProgrammingError(TasktreeError):
    """A tree was built or used in a way that can never work (wrong child count, bad parameter...).

    Raised while building, so mistakes show up before a run starts, with the node and its path in the message.
    """


class SignalError(TasktreeError, ValueError):
    """A signal was refused and nothing was recorded: unknown run or wait name, a payload that does not fit the
    wait's schema (the field is named), a finished run. `reason` says which: run, name, payload, state."""

    def __init__(self, message: str, reason: str = "payload") -> None:
        super().__init__(message)
        self.reason = reason


class WaitTimeout(TasktreeError, TimeoutError):
    """A WaitFor's deadline passed before its signal came (and it has no default): names the wait and deadline."""


class UnitParks(BaseException):  # control flow, like CancelledError: no node may turn it into a FAIL
    """The running unit's work is out (batch mode: its LLM calls are in a provider's batch): the unit ends now,
    not done, and runs again once that work is answered. A fan-out inside the unit lets its other branches run on
    first (so all of them join the same batches) and then ends the same way."""
