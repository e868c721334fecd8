"""Redis key names. Every key the library writes has a TTL or is deleted when its run ends.

Run-level keys (record, events, unit records, failed units, trace) live for TASKTREE_RUN_RETENTION; unit
bookkeeping (owners, cancel markers, reply lists) and snapshots for hours at most.
"""

PREFIX = "tasktree"


def snapshot(digest: str) -> str:
    return f"{PREFIX}:bb:{digest}"


def reply(coordinator_id: str) -> str:
    return f"{PREFIX}:reply:{coordinator_id}"


def cancel(execution_id: str) -> str:
    return f"{PREFIX}:cancel:{execution_id}"


def owner(execution_id: str) -> str:
    """The process that received the unit (set on receipt, prefetched included): with its heartbeat gone, the
    unit is sent again."""
    return f"{PREFIX}:owner:{execution_id}"


def heartbeat(process: str) -> str:
    """Renewed by a thread of each worker and coordinator process; expires TASKTREE_LEASE_TTL after it dies."""
    return f"{PREFIX}:hb:{process}"


def process_info(process: str) -> str:
    """What a live process serves (host, pid, queues, trees and their fingerprints); expires with it."""
    return f"{PREFIX}:proc:{process}"


PROCESSES = f"{PREFIX}:procs"
"""Sorted set of processes by last heartbeat (for listing the fleet and checking fingerprints at submit)."""


def run(run_id: str) -> str:
    """The run record (a hash): state, timestamps, tree, blackboards, result, error, owner..."""
    return f"{PREFIX}:run:{run_id}"


def run_field(run_id: str, name: str) -> str:
    """A large payload field of the run record (result, final blackboard...), kept apart (runs.store)."""
    return f"{PREFIX}:run:{run_id}:{name}"


RUNS = f"{PREFIX}:runs"
"""Sorted set of every run id by creation time (the list of runs)."""

ACTIVE_RUNS = f"{PREFIX}:runs:active"
"""Sorted set of queued and running runs by creation time (what supervisors scan for orphans)."""


def events(run_id: str) -> str:
    return f"{PREFIX}:events:{run_id}"


def units(run_id: str) -> str:
    """Hash of the run's unit completions by execution id (result, blackboard changes, trace fragment)."""
    return f"{PREFIX}:units:{run_id}"


def failed_units(run_id: str) -> str:
    """Set of the run's execution ids that FAILed (a retry runs exactly these again)."""
    return f"{PREFIX}:ufailed:{run_id}"


def trace(run_id: str) -> str:
    """The run's trace as the coordinator last wrote it (unit fragments stay in `units`)."""
    return f"{PREFIX}:trace:{run_id}"


def spec(digest: str) -> str:
    """A submitted spec document, content-addressed (builder.spec_build.spec_hash); lives as long as its runs."""
    return f"{PREFIX}:spec:{digest}"


def spec_layout(digest: str) -> str:
    """The node layout (kinds and trace names) of a stored spec as built, for the runs board's tree view."""
    return f"{PREFIX}:spec:{digest}:layout"


def waits(run_id: str) -> str:
    """Hash of the run's pending waits and signals not consumed yet (runs.waits)."""
    return f"{PREFIX}:waits:{run_id}"


WAITS_DUE = f"{PREFIX}:waits:due"
"""Sorted set of parked runs by their earliest wait deadline (the runs supervisors wake them)."""
