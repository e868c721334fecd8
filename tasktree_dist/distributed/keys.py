"""Redis key names. Every key the library writes has a TTL or is deleted when its run ends.

Run-level keys (record, events, unit records, failed units, trace) live for TASKTREE_RUN_RETENTION; unit
bookkeeping (owners, cancel markers, reply lists) and snapshots for hours at most.

Every key of a run carries the run's hash tag (`tasktree:{<run id>}:...`), so on a Redis Cluster each run script
touches one slot and runs spread over the masters; fleet-wide keys have their own tags (`{procs}`: process
registry and heartbeats, `{runs}`: the runs indexes; flow control and batch queues in llm/). A script never
touches a run key and a fleet-wide key together (docs/deployment.md, "Redis Cluster").
"""

PREFIX = "tasktree"


def _of_run(run_id: str, name: str) -> str:
    return f"{PREFIX}:{{{run_id}}}:{name}"


def snapshot(run_id: str, digest: str) -> str:
    """A blackboard snapshot, content-addressed within its run (a unit's admission reads it with the run's keys)."""
    return _of_run(run_id, f"bb:{digest}")


def reply(coordinator_id: str) -> str:
    return f"{PREFIX}:reply:{coordinator_id}"


def cancel(run_id: str, execution_id: str) -> str:
    return _of_run(run_id, f"cancel:{execution_id}")


def owner(run_id: str, execution_id: str) -> str:
    """The process that received the unit (set on receipt, prefetched included): with its heartbeat gone, the
    unit is sent again."""
    return _of_run(run_id, f"owner:{execution_id}")


def gate(run_id: str, gate_id: str) -> str:
    """Set of the execution ids holding a slot of one fan-out's concurrency limit: workers take and hand on its
    slots (distributed.gates); emptied by its units' completions, expires TASKTREE_REPLY_TTL after its last
    slot was taken."""
    return _of_run(run_id, f"gate:{gate_id}")


_PROCS = f"{PREFIX}:{{procs}}"


def heartbeat(process: str) -> str:
    """Renewed by a thread of each worker and coordinator process; expires TASKTREE_LEASE_TTL after it dies."""
    return f"{_PROCS}:hb:{process}"


def process_info(process: str) -> str:
    """What a live process serves (host, pid, queues, trees and their fingerprints); expires with it."""
    return f"{_PROCS}:proc:{process}"


PROCESSES = _PROCS
"""Sorted set of processes by last heartbeat (for listing the fleet and checking fingerprints at submit)."""


def run(run_id: str) -> str:
    """The run record (a hash): state, timestamps, tree, blackboards, result, error, owner..."""
    return _of_run(run_id, "run")


def run_field(run_id: str, name: str) -> str:
    """A large payload field of the run record (result, final blackboard...), kept apart (runs.store)."""
    return _of_run(run_id, f"run:{name}")


RUNS = f"{PREFIX}:{{runs}}"
"""Sorted set of every run id by creation time (the list of runs)."""

ACTIVE_RUNS = f"{RUNS}:active"
"""Sorted set of queued and running runs by creation time (what supervisors scan for orphans)."""


def events(run_id: str) -> str:
    return _of_run(run_id, "events")


def units(run_id: str) -> str:
    """Hash of the run's unit completions by execution id (result, blackboard changes, trace fragment)."""
    return _of_run(run_id, "units")


def failed_units(run_id: str) -> str:
    """Set of the run's execution ids that FAILed (a retry runs exactly these again)."""
    return _of_run(run_id, "ufailed")


def trace(run_id: str) -> str:
    """The run's trace as the coordinator last wrote it (unit fragments stay in `units`)."""
    return _of_run(run_id, "trace")


def spec(digest: str) -> str:
    """A submitted spec document, content-addressed (builder.spec_build.spec_hash); lives as long as its runs."""
    return f"{PREFIX}:spec:{{{digest}}}"


def spec_layout(digest: str) -> str:
    """The node layout (kinds and trace names) of a stored spec as built, for the runs board's tree view."""
    return f"{spec(digest)}:layout"


def waits(run_id: str) -> str:
    """Hash of the run's pending waits and signals not consumed yet (runs.waits)."""
    return _of_run(run_id, "waits")


WAITS_DUE = f"{RUNS}:due"
"""Sorted set of parked runs by their earliest wait deadline (the runs supervisors wake them)."""


AUDIT = f"{PREFIX}:audit"
"""Stream of who did what (submit, signal, cancel, retry, refused attempts), fleet-wide; capped, with a TTL."""
