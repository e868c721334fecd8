"""RunClient: submit a tree from any application and return at once; watch, cancel, retry and read runs from any
process. Every method has a synchronous and an `a`-prefixed asynchronous form; events are an async iterator.

    client = RunClient(app)
    run = client.submit("Summarise", Batch(docs=docs), labels={"team": "search"})
    run.status().state          # RunState.RUNNING
    result = run.result(timeout=600)
"""

from __future__ import annotations

import asyncio
import getpass
import math
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar

import orjson
from celery import Celery

from ..core.aio import reraise_if_cancelled
from ..core.errors import SignalError
from ..core.log import logger
from ..core.redis_client import connect
from ..core.registry import get_tree, registered_trees
from ..core.result import Result
from ..core.serde import EncodingError, UnregisteredTypeWarning, decode_value, strip_unregistered
from ..core.settings import TasktreeSettings, get_settings
from ..core.signals import PayloadSchema, Signal
from ..distributed import keys
from ..distributed.redis_retry import REDIS_ERRORS
from ..distributed.replicas import replicas_for
from ..distributed.routing import FleetView
from ..distributed.snapshots import BlackboardTooLargeError, encode_blackboard
from ..llm.batch_park import WAIT_PREFIX as BATCH_WAIT_PREFIX
from ..nodes.wait import WaitNameError, check_name
from . import trace_pages
from .audit import AuditLog
from .blackboards import check_blackboard
from .model import (
    CANCELLABLE_STATES,
    RunError,
    RunEvent,
    RunMode,
    RunNotFoundError,
    RunQueryError,
    RunState,
    RunStateError,
    RunStatus,
    SubmitError,
    check_run_id,
)
from .store import RunStore
from .waits import PendingWait, catalogue, catalogue_field, schema_check

T = TypeVar("T")

#: How long a retry waits for a just-cancelled run's coordinator to finish stopping it (a loaded machine is slow).
CLOSE_WAIT_S = 30.0


class RunList(list[RunStatus]):
    """A page of runs, newest first; `cursor` continues the listing (None when there is no more)."""

    cursor: str | None = None


class _Portal:
    """A private event loop in a daemon thread, so the synchronous methods work anywhere (also inside a loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tasktree-client", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class RunClient:
    """Submit, watch, cancel, retry and list durable runs from any process (sync and async methods); runs are
    coordinated by the fleet and recorded in Redis (TASKTREE_REDIS_URL).

    Submits, signals, cancels and retries go to the fleet's audit under `audit_as` (default `python:<login>`, from
    this host); None records nothing (the runs server audits its callers under their token names itself)."""

    def __init__(self, app: Celery | None = None, *, settings: TasktreeSettings | None = None,
                 audit_as: str | None = "") -> None:
        self.settings = settings or getattr(app, "tasktree_settings", None) or get_settings()
        self.audit_as = audit_as if audit_as != "" else f"python:{getpass.getuser()}"
        if app is None:
            from ..distributed.app import create_app

            app = create_app(self.settings)
        self.app = app
        self._stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RunStore] = weakref.WeakKeyDictionary()
        self._portal: _Portal | None = None
        self._portal_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _store(self) -> RunStore:
        loop = asyncio.get_running_loop()
        store = self._stores.get(loop)
        if store is None:
            client = connect(self.settings.redis_url, asynchronous=True)
            store = self._stores[loop] = RunStore(client, self.settings.run_retention, self.settings.events_max,
                                                          replicas=replicas_for(client, self.settings))
        return store

    async def _audit(self, action: str, outcome: str, run_id: str, detail: str | None = None) -> None:
        if self.audit_as is None:
            return
        s = self.settings
        log = AuditLog(self._store().redis, s.audit_max, s.audit_ttl, s.run_retention, s.events_max)
        await log.arecord(self.audit_as, action, outcome, run=run_id, address=socket.gethostname(), detail=detail)

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._portal_lock:
            if self._portal is None:
                self._portal = _Portal()
        return self._portal.call(coro)

    async def aclose(self) -> None:
        """Close this loop's Redis client (the synchronous side is closed by `close()`)."""
        store = self._stores.pop(asyncio.get_running_loop(), None)
        if store is not None:
            await store.redis.aclose()

    def close(self) -> None:
        if self._portal is not None:
            self._sync(self.aclose())
            self._portal.close()
            self._portal = None

    def __enter__(self) -> RunClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submit -----------------------------------------------------------------------------------------------
    async def asubmit(
        self,
        tree: Any,
        blackboard: Any = None,
        run_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> Run:
        """Queue a run of `tree` (a built Tree, a registered tree's name, or a spec document: a dict, or a tree
        built by `Tree.from_spec`) on `blackboard`; returns at once. `variables` fill a spec's `$name`s.

        An existing `run_id` of the same tree and blackboard returns that run (submit is idempotent); of another
        tree or blackboard it is refused (an idempotency key names one submission). An unregistered tree, a tree
        no live worker has at this fingerprint, a spec naming what the fleet has not registered, a blackboard that
        does not fit the tree's schema or cannot be encoded is refused here with SubmitError (SpecError for a
        spec's own problems, with their places), and nothing is queued."""
        run_id = check_run_id(run_id) if run_id is not None else uuid.uuid4().hex
        labels = self._labels(labels)
        store = self._store()
        record = await store.record(run_id)
        document = tree if isinstance(tree, dict) else getattr(tree, "spec", None)
        if document is not None:
            name = str(document.get("name", ""))
            if blackboard is None and document.get("kind") == "agent":
                blackboard = {}  # an agent's inputs may all come from variables and its pre-hook
        else:
            name = tree if isinstance(tree, str) else getattr(tree, "name", "")
        try:
            encoded, payload = encode_blackboard(blackboard, self.settings.max_blackboard_bytes)
        except (EncodingError, BlackboardTooLargeError) as exc:
            raise SubmitError(f"run of tree {name!r}: cannot submit the blackboard: {exc}") from None
        if record is not None:
            await self._same_submission(store, run_id, record, name, payload)
            return Run(self, run_id)
        extra: dict[str, str] = {}
        if document is not None:
            given = {} if isinstance(tree, dict) else dict(getattr(tree, "spec_variables", None) or {})
            name, digest = await self._check_spec(store, document, blackboard, {**given, **(variables or {})})
            fingerprint, extra = "", {"spec": digest}
        else:
            name, fingerprint = await self._check_tree(store, tree)
            check_blackboard(await self._tree_schema(store, name), blackboard, name)
        fields = {
            "tree": name, "fingerprint": fingerprint, "mode": RunMode.SUBMITTED.value,
            "labels": orjson.dumps(labels).decode(), "blackboard": payload.decode(),
            "queue": self.settings.runs_queue, **extra,
        }
        local = registered_trees().get(name)
        if local is not None and local.fingerprint == fingerprint:
            fields["waitdefs"] = catalogue_field(local)
        if await store.create(run_id, RunState.QUEUED, fields):
            await self._audit("submit", "ok", run_id, f"tree {name}")
            await self._wake_coordinator(run_id, name, labels)
        return Run(self, run_id)

    def submit(
        self, tree: Any, blackboard: Any = None, run_id: str | None = None, labels: Mapping[str, str] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> Run:
        return self._sync(self.asubmit(tree, blackboard, run_id, labels, variables))

    async def _check_spec(
        self, store: RunStore, document: dict[str, Any], blackboard: Any, variables: dict[str, Any]
    ) -> tuple[str, str]:
        """(name, spec hash) of a spec checked against what the fleet (and this process) registered, stored for
        the coordinator and workers that will build it."""
        from ..builder.spec import validate
        from ..builder.spec_lookup import find_type
        from ..builder.spec_palette import merge_palettes, process_palette
        from ..builder.spec_source import SpecError
        from ..distributed.spec_trees import store_spec

        # the coordinators build the spec: their palette decides (this process's only while no fleet is alive)
        palette = merge_palettes(await self._fleet_palettes(store) or [process_palette()])
        problems = validate(document, variables, palette=palette)
        if problems:
            raise SpecError(problems)
        schema = document.get("blackboard")
        if isinstance(schema, str):
            key = find_type(palette["types"], schema)
            schema = palette["types"][key] if key is not None else None
        name = str(document.get("name"))
        check_blackboard(schema if isinstance(schema, dict) else None, blackboard, name)
        stored = {"document": document, "variables": variables}
        return name, await store_spec(store.redis, stored, self.settings.run_retention)

    async def _fleet_palettes(self, store: RunStore) -> list[dict[str, Any]]:
        return [info.get("palette") or {} for info in (await self._fleet_infos(store)).values()]

    async def _tree_schema(self, store: RunStore, name: str) -> dict[str, Any] | None:
        """A code tree's blackboard schema: from this process when it built the tree, else from the fleet."""
        from ..builder.spec_palette import blackboard_schema

        local = registered_trees().get(name)
        if local is not None:
            return blackboard_schema(local)
        for palette in await self._fleet_palettes(store):
            tree = (palette.get("trees") or {}).get(name)
            if tree and tree.get("blackboard"):
                return tree["blackboard"]
        return None

    @staticmethod
    async def _same_submission(
        store: RunStore, run_id: str, record: dict[str, str], tree: str, payload: bytes
    ) -> None:
        """Refuse reusing `run_id` (an idempotency key) for another tree or another blackboard, naming both."""
        if record.get("tree") != tree:
            raise SubmitError(f"run id {run_id!r} is a run of tree {record.get('tree')!r}, not of {tree!r}: "
                              "an idempotency key names one submission; use another run id")
        stored = await store.payload(record, "blackboard")
        if stored is not None and orjson.loads(stored) != orjson.loads(payload):
            raise SubmitError(f"run id {run_id!r} of tree {tree!r} was submitted with another blackboard "
                              f"({_clip(stored)} there, {_clip(payload)} here): use another run id")

    @staticmethod
    def _labels(labels: Mapping[str, str] | None) -> dict[str, str]:
        out = dict(labels or {})
        bad = [k for k, v in out.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise SubmitError(f"labels must map strings to strings; bad entries: {bad[:5]!r}")
        return out

    async def _check_tree(self, store: RunStore, tree: Any) -> tuple[str, str]:
        """(name, fingerprint) of the tree to run, refusing one the fleet cannot run as submitted."""
        if isinstance(tree, str):
            name, local = tree, registered_trees().get(tree)
        else:
            name = getattr(tree, "name", "")
            try:
                local = get_tree(name) if name else None
            except LookupError:
                local = None
            if local is not tree:
                raise SubmitError(
                    f"tree {name or tree!r} is not registered under its name: give it a unique name and build it "
                    "at import time in a module the workers import (TASKTREE_IMPORTS)"
                )
        fleet = [p for p in await FleetView(store.redis, cache_s=0).processes()
                 if p.role == "worker" and self.settings.runs_queue in p.queues]
        serving = {p.process: p.trees.get(name) for p in fleet}
        if local is None:
            prints = {fp for fp in serving.values() if fp}
            if not prints:
                known = sorted({n for p in fleet for n in p.trees})[:20]
                raise SubmitError(
                    f"tree {name!r} is registered neither here nor on any live worker (they know: "
                    f"{', '.join(known) or 'nothing'}; live workers: {len(fleet)})"
                )
            if len(prints) > 1:
                raise SubmitError(f"live workers run {len(prints)} versions of tree {name!r}: {sorted(prints)}")
            return name, prints.pop()
        for process, fingerprint in sorted(serving.items()):
            if fingerprint is None:
                continue
            if fingerprint != local.fingerprint:
                raise SubmitError(
                    f"tree {name!r} has fingerprint {local.fingerprint} here but {fingerprint} on worker {process}: "
                    "the submitter and the fleet run different versions of the tree; redeploy one of them"
                )
        if fleet and local.fingerprint not in serving.values():  # no live workers at all: it waits for one
            raise SubmitError(
                f"no live worker serving {self.settings.runs_queue!r} has tree {name!r} registered (live workers: "
                f"{'; '.join(p.describe() for p in fleet)}); list its module in their TASKTREE_IMPORTS"
            )
        return name, local.fingerprint

    async def _fleet_infos(self, store: RunStore) -> dict[str, dict[str, Any]]:
        """Heartbeat info of each live worker process serving the runs queue."""
        processes = [p.decode() for p in await store.redis.zrange(keys.PROCESSES, 0, -1)]
        if not processes:
            return {}
        infos = await store.redis.mget([keys.process_info(p) for p in processes])
        out = {}
        for process, raw in zip(processes, infos, strict=True):
            if raw is None:
                continue
            info = orjson.loads(raw)
            if info.get("role") == "worker" and self.settings.runs_queue in (info.get("queues") or ()):
                out[process] = info
        return out

    async def _wake_coordinator(self, run_id: str, tree: str, labels: dict[str, str]) -> None:
        """The coordinate task is the fast path; if the broker cannot take it, a supervisor starts the run."""
        def send() -> None:
            self.app.send_task("tasktree.coordinate", args=[run_id], kwargs={"tree": tree, "labels": labels},
                               queue=self.settings.runs_queue)

        try:
            await asyncio.to_thread(send)
        except Exception as exc:  # noqa: BLE001 - the record is queued: a supervisor claims it
            logger.warning("run %s is queued but its coordinator message was not sent (%s: %s); a supervisor will "
                           "start it", run_id, type(exc).__name__, exc)

    # -- reading ----------------------------------------------------------------------------------------------
    async def aget(self, run_id: str) -> Run:
        await self.astatus(run_id)
        return Run(self, run_id)

    def get(self, run_id: str) -> Run:
        return self._sync(self.aget(run_id))

    async def astatus(self, run_id: str) -> RunStatus:
        status = await self._store().status(run_id)
        if status is None:
            raise RunNotFoundError(
                f"no run {run_id!r} (never submitted, or older than TASKTREE_RUN_RETENTION="
                f"{self.settings.run_retention} s)"
            )
        return status

    def status(self, run_id: str) -> RunStatus:
        return self._sync(self.astatus(run_id))

    async def alist(
        self, state: RunState | str | None = None, tree: str | None = None, limit: int = 50, cursor: str | None = None,
        *, labels: Mapping[str, str] | None = None,
    ) -> RunList:
        """Runs newest first, filtered by state, tree and labels (a run must carry every one given)."""
        found, next_cursor = await self._store().list(check_query(state, limit, cursor), tree, limit, cursor,
                                                      labels)
        page = RunList(found)
        page.cursor = next_cursor
        return page

    def list(
        self, state: RunState | str | None = None, tree: str | None = None, limit: int = 50, cursor: str | None = None,
        *, labels: Mapping[str, str] | None = None,
    ) -> RunList:
        return self._sync(self.alist(state, tree, limit, cursor, labels=labels))

    async def aresult(self, run_id: str, timeout: float | None = None) -> Result:
        """The run's Result once it finished; TimeoutError if it has not within `timeout` seconds."""
        record = await self._wait_finished(run_id, timeout)
        encoded = await self._store().payload(record, "result")
        if not encoded:
            return Result.FAIL(None)
        value = decode_value(orjson.loads(encoded))
        return value if isinstance(value, Result) else Result.OK(value)

    def result(self, run_id: str, timeout: float | None = None) -> Result:
        return self._sync(self.aresult(run_id, timeout))

    async def ablackboard(self, run_id: str, timeout: float | None = 0, typed: bool = False) -> Any:
        """The final blackboard, typed as submitted (RunStateError while the run is not finished). In a process
        that has not registered its type (does not import the tree's module) it comes as plain JSON dicts, with a
        UnregisteredTypeWarning naming the missing types; `typed=True` raises EncodingError instead."""
        try:
            record = await self._wait_finished(run_id, timeout)
        except TimeoutError:
            raise RunStateError(f"run {run_id} has not finished: its final blackboard is not there yet") from None
        encoded = await self._store().payload(record, "final_blackboard")
        if not encoded:
            return None
        value = orjson.loads(encoded)
        try:
            return decode_value(value)
        except EncodingError:
            if typed:
                raise
        missing: set[str] = set()
        plain = decode_value(strip_unregistered(value, missing))
        warnings.warn(UnregisteredTypeWarning(
            f"run {run_id}: type(s) {', '.join(sorted(missing))} of its blackboard are not registered in this "
            f"process: returning plain JSON dicts (import the module of tree {record.get('tree')!r}, or "
            "register_type, for typed values; typed=True raises instead)"), stacklevel=3)
        return plain

    def blackboard(self, run_id: str, timeout: float | None = 0, typed: bool = False) -> Any:
        return self._sync(self.ablackboard(run_id, timeout, typed))

    async def _wait_finished(self, run_id: str, timeout: float | None) -> dict[str, str]:
        store = self._store()
        deadline = None if timeout is None else time.monotonic() + timeout
        after = await store.last_event_id(run_id)
        record: dict[str, str] | None = {"state": "unknown"}
        while True:
            try:
                record = await store.record(run_id)
                if record is None:
                    raise RunNotFoundError(f"no run {run_id!r}")
                if RunState(record["state"]).finished and not await self._closing(store, record):
                    return record
            except REDIS_ERRORS as exc:  # Redis restarting: keep waiting (within the timeout)
                reraise_if_cancelled()
                logger.warning("waiting for run %s: Redis unavailable (%s); retrying", run_id, exc)
                await asyncio.sleep(0.2)  # back-off, not synchronisation
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"run {run_id} is still {record.get('state')} after {timeout} s")
            block = 1000 if left is None else max(1, min(1000, int(left * 1000)))
            try:
                events = await store.events(run_id, after, block_ms=block, count=100)
            except REDIS_ERRORS:
                reraise_if_cancelled()
                continue
            if events:
                after = events[-1].id

    @staticmethod
    async def _closing(store: RunStore, record: dict[str, str]) -> bool:
        """A run stopped from outside is finished at once; its coordinator then writes the result and trace
        (within a second). Wait for that, unless that coordinator is gone."""
        closer = record.get("closing")
        if not closer:
            return False
        return bool(await store.redis.exists(keys.heartbeat(closer)))

    async def atrace(self, run_id: str, full: bool = False) -> dict[str, Any] | None:
        """The run's trace as last written by its coordinator (tinytasktree's JSON), None before the first write.

        A fan-out larger than TASKTREE_TRACE_FANOUT_MAX keeps its first children (and failed ones) in the trace
        and says how to read the others (`paged`; see `atrace_children`); `full` reads them all in."""
        raw = await self._store().trace(run_id)
        if not raw:
            return None
        trace = orjson.loads(raw)
        return await trace_pages.expand(self._store(), run_id, trace) if full else trace

    def trace(self, run_id: str, full: bool = False) -> dict[str, Any] | None:
        return self._sync(self.atrace(run_id, full))

    async def aspec(self, run_id: str) -> dict[str, Any] | None:
        """The spec a run was submitted as ({document, variables, layout}), None for a run of a code tree."""
        from ..distributed.spec_trees import spec_view

        store = self._store()
        digest = await store.redis.hget(keys.run(run_id), "spec")
        return await spec_view(store.redis, digest.decode()) if digest else None

    def spec(self, run_id: str) -> dict[str, Any] | None:
        return self._sync(self.aspec(run_id))

    async def atrace_children(self, run_id: str, path: list[str], offset: int = 0, limit: int = 100
                              ) -> dict[str, Any]:
        """Children `offset`.. of the paged fan-out at `path` (child keys from the trace's root), in index order:
        {"children": {key: trace JSON}, "total", "next" (offset of the next page or None), "missing"}."""
        trace = await self.atrace(run_id)
        node = trace_pages.find_node(trace, path) if trace is not None else None
        if node is None or not node.get("paged"):
            raise LookupError(f"run {run_id}: no fan-out with paged children at {'/'.join(path) or '(root)'}")
        return await trace_pages.read_children(self._store(), run_id, node["paged"], offset, limit)

    def trace_children(self, run_id: str, path: list[str], offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._sync(self.atrace_children(run_id, path, offset, limit))

    async def aevents(
        self, run_id: str, from_id: str = "0", follow: bool = True, poll_ms: int = 1000
    ) -> AsyncIterator[RunEvent]:
        """Events after `from_id` ("0": all kept). With `follow`, waits for new ones until the run finishes."""
        store = self._store()
        after = from_id
        while True:
            events = await store.events(run_id, after, block_ms=poll_ms if follow else None)
            for event in events:
                after = event.id
                yield event
            if not follow and not events:
                return
            if follow and not events:
                record = await store.record(run_id)
                if record is None or RunState(record["state"]).finished:
                    for event in await store.events(run_id, after):
                        yield event
                    return

    async def aevents_after(
        self, run_id: str, after: str = "0", block_ms: int | None = None, count: int = 500
    ) -> list[RunEvent]:
        """One page of the run's events after stream id `after` ("$": only new ones), waiting up to `block_ms` for
        some: for servers that pass the stream on (the runs board's live page), one page per read."""
        return await self._store().events(run_id, after, block_ms=block_ms, count=count)

    def events_after(
        self, run_id: str, after: str = "0", block_ms: int | None = None, count: int = 500
    ) -> list[RunEvent]:
        return self._sync(self.aevents_after(run_id, after, block_ms, count))

    # -- changing ---------------------------------------------------------------------------------------------
    async def acancel(self, run_id: str) -> bool:
        """Cancel a queued or running run: its coordinator stops it and its running units stop within a second.
        False (and nothing changes) when the run already finished."""
        error = RunError(message=f"run {run_id} was cancelled (RunClient.cancel)")
        outcome = await self._store().transition(run_id, CANCELLABLE_STATES, RunState.CANCELLED,
                                                 event={"error": error.message},
                                                 fields={"error": error.model_dump_json()})
        if outcome.reason == "missing":
            raise RunNotFoundError(f"no run {run_id!r}")
        await self._audit("cancel", "ok" if outcome.ok else f"failed: already {outcome.detail}", run_id)
        return outcome.ok

    def cancel(self, run_id: str) -> bool:
        return self._sync(self.acancel(run_id))

    async def asignal(self, run_id: str, name: str, payload: Any = None, signal_id: str | None = None) -> bool:
        """Signal the run's wait `name` (or keep the signal for when the wait is reached). The payload is checked
        against the wait's schema first: SignalError names the field, and nothing is recorded. Returns True once
        recorded, False when `signal_id` was recorded before (nothing changes). A parked run resumes."""
        store = self._store()
        fields = ("state", "tree", "fingerprint", "labels", "waitdefs")  # not the blackboards: a signal stays cheap
        values = await store.redis.hmget(keys.run(run_id), fields)
        if values[0] is None:
            raise SignalError(f"no run {run_id!r} (never submitted, or older than TASKTREE_RUN_RETENTION)", "run")
        record = {field: value.decode() for field, value in zip(fields, values, strict=True) if value is not None}
        state = RunState(record["state"])
        if state.finished:
            raise SignalError(f"run {run_id} is {state.value}: a finished run takes no signals", "state")
        try:
            check_name(name, f"run {run_id}: signal")
        except WaitNameError as exc:
            raise SignalError(str(exc), "name") from None
        if name.startswith(BATCH_WAIT_PREFIX):  # answered by the batch's poller: a signal here would go live too
            raise SignalError(f"run {run_id}: {name!r} is a batched LLM call's wait; its batch answers it (a signal "
                              "would send the call live while its batch still runs it: paid twice)", "name")
        checked = await self._check_signal(store, run_id, record, name, payload)
        signal = Signal(name, checked, signal_id or uuid.uuid4().hex)
        kind, detail = await store.waits.signal(run_id, signal, signal_id is not None)
        if kind == "missing":
            raise SignalError(f"no run {run_id!r}", "run")
        if kind == "state":
            raise SignalError(f"run {run_id} is {detail}: a finished run takes no signals", "state")
        await self._audit("signal", "ok" if kind != "duplicate" else "duplicate", run_id, f"wait {name}")
        if kind == "duplicate":
            return False
        if kind == "woke":
            await self._wake_coordinator(run_id, record.get("tree", ""), orjson.loads(record.get("labels") or "{}"))
        return True

    def signal(self, run_id: str, name: str, payload: Any = None, signal_id: str | None = None) -> bool:
        return self._sync(self.asignal(run_id, name, payload, signal_id))

    async def _check_signal(self, store: RunStore, run_id: str, record: dict[str, str], name: str,
                            payload: Any) -> Any:
        """The payload as recorded (plain JSON), checked against the schema of the wait it will answer: a pending
        wait of that name, else the waits the run's tree can reach (see runs.waits.catalogue)."""
        what = f"run {run_id}: signal {name!r}"
        try:
            tree = get_tree(record.get("tree", ""))
        except LookupError:
            tree = None
        known = catalogue(tree, record)
        pending = [wait for wait in await store.waits.pending(run_id) if wait.name == name]
        if pending:
            nodes = [w for w in (known[0] if known else ()) if w.node == pending[0].node]
            return nodes[0].check(payload, what) if nodes else schema_check(pending[0].schema)(payload, what)
        if known is None:
            return PayloadSchema().check(payload, what)  # checked when its wait is reached (tree unknown here)
        waits, open_ = known
        candidates = [w for w in waits if w.name == name]
        if not candidates and open_:
            return PayloadSchema().check(payload, what)  # a Gather's trees are known when reached
        candidates = candidates or [w for w in waits if w.name is None]
        if not candidates:
            names = ", ".join(sorted({repr(w.name) for w in waits})) or "none"
            raise SignalError(f"{what}: tree {record.get('tree')!r} has no WaitFor named {name!r} (its waits: "
                              f"{names})", "name")
        errors = []
        for wait in candidates:
            try:
                return wait.check(payload, what)
            except SignalError as exc:
                errors.append(exc)
        raise errors[0]

    async def awaits(self, run_id: str) -> list[PendingWait]:
        """The run's pending waits (name, node, prompt, schema, since, deadline), oldest first."""
        await self.astatus(run_id)
        return await self._store().waits.pending(run_id)

    def waits(self, run_id: str) -> list[PendingWait]:
        return self._sync(self.awaits(run_id))

    async def aretry(self, run_id: str) -> Run:
        """Run a failed or cancelled run again under the same id: units that succeeded are replayed from their
        records, only failed and unfinished work runs again."""
        store = self._store()
        await self._wait_closed(store, run_id)
        outcome = await store.retry(run_id)
        if outcome.reason == "missing":
            raise RunNotFoundError(f"no run {run_id!r}")
        if not outcome.ok:
            raise RunStateError(f"run {run_id} is {outcome.detail}: only failed or cancelled runs can be retried")
        await store.clear_cancel_markers(run_id)
        await self._audit("retry", "ok", run_id)
        record = await store.record(run_id) or {}
        await self._wake_coordinator(run_id, record.get("tree", ""), orjson.loads(record.get("labels") or "{}"))
        return Run(self, run_id)

    def retry(self, run_id: str) -> Run:
        return self._sync(self.aretry(run_id))

    async def _wait_closed(self, store: RunStore, run_id: str) -> None:
        """A run cancelled a moment ago may still be stopping in its coordinator, which marks the units it abandons
        as cancelled: retrying before it is done would leave such markers behind for the new attempt, whose units
        would then stop as cancelled. So a retry never goes ahead while that coordinator is alive and still closing:
        past the deadline it is refused, saying so (try again), rather than started to fail."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while True:
            record = await store.record(run_id)
            if record is None or not RunState(record["state"]).finished or not await self._closing(store, record):
                return
            if time.monotonic() >= deadline:
                raise RunStateError(f"run {run_id} is still being stopped by its coordinator {record['closing']} "
                                    f"after {CLOSE_WAIT_S:.0f} s: retry it once that is done")
            await asyncio.sleep(0.05)  # polling with a deadline


class Run:
    """A handle on one run (cheap: holds its id and the client)."""

    def __init__(self, client: RunClient, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def status(self) -> RunStatus:
        return self.client.status(self.id)

    async def astatus(self) -> RunStatus:
        return await self.client.astatus(self.id)

    def result(self, timeout: float | None = None) -> Result:
        return self.client.result(self.id, timeout)

    async def aresult(self, timeout: float | None = None) -> Result:
        return await self.client.aresult(self.id, timeout)

    def blackboard(self, timeout: float | None = 0, typed: bool = False) -> Any:
        return self.client.blackboard(self.id, timeout, typed)

    async def ablackboard(self, timeout: float | None = 0, typed: bool = False) -> Any:
        return await self.client.ablackboard(self.id, timeout, typed)

    def cancel(self) -> bool:
        return self.client.cancel(self.id)

    async def acancel(self) -> bool:
        return await self.client.acancel(self.id)

    def retry(self) -> Run:
        return self.client.retry(self.id)

    def signal(self, name: str, payload: Any = None, signal_id: str | None = None) -> bool:
        return self.client.signal(self.id, name, payload, signal_id)

    async def asignal(self, name: str, payload: Any = None, signal_id: str | None = None) -> bool:
        return await self.client.asignal(self.id, name, payload, signal_id)

    def waits(self) -> list[PendingWait]:
        return self.client.waits(self.id)

    async def awaits(self) -> list[PendingWait]:
        return await self.client.awaits(self.id)

    async def aretry(self) -> Run:
        return await self.client.aretry(self.id)

    def trace(self, full: bool = False) -> dict[str, Any] | None:
        return self.client.trace(self.id, full)

    async def atrace(self, full: bool = False) -> dict[str, Any] | None:
        return await self.client.atrace(self.id, full)

    def trace_children(self, path: list[str], offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self.client.trace_children(self.id, path, offset, limit)

    def events(self, from_id: str = "0", follow: bool = True) -> AsyncIterator[RunEvent]:
        return self.client.aevents(self.id, from_id, follow)

    def __repr__(self) -> str:
        return f"Run({self.id!r})"


def _clip(payload: str | bytes, most: int = 80) -> str:
    text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
    return text if len(text) <= most else text[: most - 3] + "..."


def check_query(state: RunState | str | None, limit: int, cursor: str | None) -> RunState | None:
    """The state of a listing, after refusing a bad state, limit or cursor with one line (RunQueryError)."""
    try:
        parsed = RunState(state) if state else None
    except ValueError:
        raise RunQueryError(f"state must be one of {', '.join(s.value for s in RunState)}, not {state!r}") from None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise RunQueryError(f"limit must be an integer >= 1, not {limit!r}")
    if cursor is not None:
        try:
            finite = math.isfinite(float(cursor))
        except ValueError:
            finite = False
        if not finite:
            raise RunQueryError(f"cursor {cursor[:40]!r} is not a cursor of a previous page (a number)")
    return parsed
