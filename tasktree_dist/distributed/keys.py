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
