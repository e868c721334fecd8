"""Who can run a unit: a live process that serves the unit's queue and has its tree registered at its fingerprint.

Every process publishes its queues and registered trees (name -> fingerprint) with its heartbeat (liveness), so
any process can tell who can run what from Redis alone. Three places use it:

* a worker never takes a unit it cannot run (tree not registered here, or another version): it hands the message
  back to its queue untouched (`hand_back_delay` spaces its own retakes out) and never marks it as its own, so a
  process that has the tree takes it;
* the coordinator's watchdog fails a sent unit that no live process can run, naming the live processes and their
  trees: within a second or two when live workers serve its queue but none has its tree at its fingerprint (a
  deployment mistake), after TASKTREE_UNRUNNABLE_LIMIT seconds when no live worker serves its queue at all
  (workers restarting; heartbeats lapse for everyone in a Redis blip);
* submit refuses a tree that no live worker serving the runs queue has at the submitted fingerprint.

A tree built from a submitted spec (`<name>@<hash>`) is one every worker serving the queue can build.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..builder.spec_palette import SPEC_TREE_MARK
from ..core.registry import registered_trees
from . import keys

#: How long a process reuses what it read of the fleet (a worker handing back many units reads it once).
FLEET_CACHE_S = 1.0
#: A handed-back message is re-published after this many seconds times 2**(hand-backs so far), at most 1 s: the
#: process that cannot run it (often the idlest one) must not spin taking it again while capable ones are busy.
HAND_BACK_BASE_S = 0.01
HAND_BACK_MAX_S = 1.0
#: A run's coordinate message is handed back this many times at most (a fast path only: a queued run nobody
#: claimed is started by a supervisor of a process that has its tree, or failed when none has it; coordinator.py).
RUN_HAND_BACKS = 8


@dataclass(frozen=True)
class FleetProcess:
    """One live process as its heartbeat describes it."""

    process: str
    role: str = "worker"
    queues: tuple[str, ...] = ()
    trees: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> FleetProcess:
        trees = info.get("trees") or {}
        return cls(
            process=str(info.get("process", "?")), role=str(info.get("role", "coordinator")),
            queues=tuple(str(q) for q in info.get("queues") or ()),
            trees={str(k): str(v) for k, v in trees.items()} if isinstance(trees, dict) else {},
        )

    def can_run(self, queue: str, tree: str, fingerprint: str) -> bool:
        if self.role != "worker" or queue not in self.queues:
            return False
        return is_spec_tree(tree) or self.trees.get(tree) == fingerprint

    def describe(self) -> str:
        trees = ", ".join(f"{name}@{fp[:8]}" for name, fp in sorted(self.trees.items())) or "no trees"
        return f"{self.process} [queues {', '.join(self.queues) or 'none'}; {trees}]"


def is_spec_tree(tree: str) -> bool:
    """A tree built from a submitted spec (`<name>@<hash>`): any worker builds it from Redis (spec_trees); a part it
    lacks fails the unit naming it."""
    return SPEC_TREE_MARK in tree


def cannot_run_here(tree: str, fingerprint: str) -> str | None:
    """Why this process cannot run a unit of `tree` at `fingerprint` (None: it can)."""
    if is_spec_tree(tree):
        return None
    local = registered_trees().get(tree)
    if local is None:
        return f"tree {tree!r} is not registered in this process"
    if local.fingerprint != fingerprint:
        return f"tree {tree!r} has fingerprint {local.fingerprint} here, the unit needs {fingerprint}"
    return None


def hand_back_delay(handed_back: int) -> float:
    return min(HAND_BACK_MAX_S, HAND_BACK_BASE_S * 2 ** max(0, handed_back))


def nobody_can_run(queue: str, tree: str, fingerprint: str, processes: list[FleetProcess]) -> str:
    """The one-line error of a unit no live process can run, naming every live process and its trees."""
    live = "; ".join(p.describe() for p in processes if p.role == "worker") or "none"
    return (f"no live worker serves queue {queue!r} with tree {tree!r} at fingerprint {fingerprint} "
            f"(live workers: {live}); start a worker with its module in TASKTREE_IMPORTS on that queue")


def parse_infos(raws: list[bytes | None]) -> list[FleetProcess]:
    out = []
    for raw in raws:
        if raw is None:
            continue
        try:
            out.append(FleetProcess.from_info(orjson.loads(raw)))
        except (ValueError, AttributeError, TypeError):
            continue  # a foreign or older info: it names nothing we can route to
    return sorted(out, key=lambda p: p.process)


class FleetView:
    """What the live processes serve, read from their heartbeat infos (redis.asyncio), cached FLEET_CACHE_S."""

    def __init__(self, redis: Any, cache_s: float = FLEET_CACHE_S) -> None:
        self.redis = redis
        self.cache_s = cache_s
        self._read_at = -1e9
        self._processes: list[FleetProcess] = []

    async def processes(self) -> list[FleetProcess]:
        if time.monotonic() - self._read_at < self.cache_s:
            return self._processes
        names = [n.decode(errors="replace") for n in
                 await self.redis.zrangebyscore(keys.PROCESSES, time.time() - 3600, "+inf")]
        raws = await self.redis.mget([keys.process_info(n) for n in names]) if names else []
        self._processes, self._read_at = parse_infos(raws), time.monotonic()
        return self._processes

    async def why_not(self, queue: str, tree: str, fingerprint: str) -> str | None:
        """None when some live process can run the unit; else the error naming the live processes."""
        processes = await self.processes()
        if any(p.can_run(queue, tree, fingerprint) for p in processes):
            return None
        return nobody_can_run(queue, tree, fingerprint, processes)

    async def served(self, queue: str) -> bool:
        """Whether some live worker consumes `queue` (whatever trees it has)."""
        return any(p.role == "worker" and queue in p.queues for p in await self.processes())


def split_runnable(units: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(units this process can run, the others grouped by why not). A unit that names no tree or fingerprint is
    not routed: the runtime refuses it (FAIL or drop, logged), as it does every unit it cannot read."""
    runnable: list[dict[str, Any]] = []
    foreign: dict[str, list[dict[str, Any]]] = {}
    for unit in units:
        tree, fingerprint = unit.get("tree"), unit.get("fingerprint")
        why = cannot_run_here(tree, fingerprint) if isinstance(tree, str) and isinstance(fingerprint, str) else None
        if why is None:
            runnable.append(unit)
        else:
            foreign.setdefault(why, []).append(unit)
    return runnable, foreign


def hand_back(app: Any, units: list[dict[str, Any]], handed_back: int) -> None:
    """Publish `units` again, untouched, to their own queue(s) (one message per queue), counting the hand-back:
    a process that has their tree takes them. Sleeps `hand_back_delay` first (back-off, not synchronisation)."""
    time.sleep(hand_back_delay(handed_back))
    by_queue: dict[str, list[dict[str, Any]]] = {}
    for unit in units:
        by_queue.setdefault(str(unit.get("queue")), []).append(unit)
    for queue, group in by_queue.items():
        kwargs = {"tree": str(group[0].get("tree")), "addresses": [str(u.get("address") or u.get("tree"))
                                                                   for u in group][:20],
                  "run_id": str(group[0].get("run_id")), "handed_back": handed_back + 1}
        app.send_task("tasktree.execute", args=[group], kwargs=kwargs, queue=queue,
                      argsrepr=f"[{len(group)} units of {kwargs['tree']}, handed back {handed_back + 1}x]")


def hand_back_run(app: Any, run_id: str, tree: str, labels: dict[str, str], handed_back: int) -> str:
    """Publish a run's coordinate message again for a process that has its tree; says what happened."""
    if handed_back >= RUN_HAND_BACKS:
        return "left queued for a supervisor of a process that has its tree"
    time.sleep(hand_back_delay(handed_back))  # back-off, not synchronisation
    app.send_task("tasktree.coordinate", args=[run_id],
                  kwargs={"tree": tree, "labels": labels, "handed_back": handed_back + 1},
                  queue=app.tasktree_settings.runs_queue)
    return "handed back to the runs queue"
