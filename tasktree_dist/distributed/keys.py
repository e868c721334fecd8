"""Redis key names. Every key the library writes has a TTL or is deleted when its run ends."""

PREFIX = "tasktree"


def snapshot(digest: str) -> str:
    return f"{PREFIX}:bb:{digest}"


def reply(coordinator_id: str) -> str:
    return f"{PREFIX}:reply:{coordinator_id}"


def done(execution_id: str) -> str:
    return f"{PREFIX}:done:{execution_id}"


def cancel(execution_id: str) -> str:
    return f"{PREFIX}:cancel:{execution_id}"


def started(execution_id: str) -> str:
    """Which worker took the unit (lives as long as replies): with no lease left, that worker died."""
    return f"{PREFIX}:started:{execution_id}"


def lease(execution_id: str) -> str:
    """Renewed by the worker while the unit runs; expires within TASKTREE_LEASE_TTL of the worker dying."""
    return f"{PREFIX}:lease:{execution_id}"
