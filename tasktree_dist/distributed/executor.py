"""CeleryExecutor: the coordinator side of distributed execution.

Control flow (Sequence, Selector, If, While, Retry, Timeout, Cacher...) runs here. Work is shipped as units:
Function and LLM leaves, each Parallel child and each Gather tree (whole, on one worker), and whatever sits under
`.Remote(queue=...)`; `.Local()` keeps a subtree here. Units carry ids only; blackboards go through Redis.
Workers push completions to one Redis list per coordinator loop, drained by a single async reader: thousands of
units in flight cost a future each, no thread and no blocking `.get()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from redis.exceptions import RedisError

from broker_config import TasktreeSettings

from ..core.errors import TasktreeError
from ..core.log import logger
from ..core.progress import ProgressCounter
from ..core.registry import get_tree
from ..core.result import Result, Status
from ..core.serde import EncodingError, decode_value, encode_value
from ..tracing.trace import TraceNode
from . import changes, keys
from .protocol import Completion, Unit
from .runtime import REDIS_MAX_CONNECTIONS
from .snapshots import encode_blackboard, store_snapshots

if TYPE_CHECKING:
    from ..core.context import Context
    from ..core.executor import GatherNode, ParallelNode, RunnableTree
    from ..core.tree import Tree
    from ..nodes.base import Node

LOCAL, REMOTE, CONTROL = "local", "remote", "control"


#: Longest argument text a message carries for Flower and logs (Celery's own limit).
REPR_MAX = 1024


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DispatchError(TasktreeError):
    """Work that cannot be shipped (unregistered tree, unencodable blackboard...); the node FAILs with this."""


@dataclass(eq=False)
class _InFlight:
    """A unit sent and not yet answered: what the reader resolves and the lease watchdog sends again."""

    unit: Unit
    future: asyncio.Future[Completion]
    #: Workers that died running it (its lease expired).
    lost: list[str] = field(default_factory=list)


class _LoopState:
    """Per event loop: the Redis client, this coordinator's reply list and the units waiting on it."""

    def __init__(self, redis_url: str) -> None:
        import redis.asyncio as redis

        # a blocking pool: hundreds of concurrent dispatches wait for a connection instead of failing
        pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=REDIS_MAX_CONNECTIONS)
        self.redis = redis.Redis(connection_pool=pool)
        self.reply_key = keys.reply(uuid.uuid4().hex)
        self.inflight: dict[str, _InFlight] = {}
        self.reader: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None

    def resolve(self, completion: Completion) -> None:
        entry = self.inflight.pop(completion.execution_id, None)
        if entry is not None and not entry.future.done():
            entry.future.set_result(completion)


class CeleryExecutor:
    """Ships work to `celery -A worker worker` processes; use as `Context(executor=CeleryExecutor(app))`."""

    def __init__(
        self,
        app: Celery,
        *,
        redis_url: str | None = None,
        queue: str | None = None,
        batch_size: int | None = None,
        settings: TasktreeSettings | None = None,
    ) -> None:
        settings = settings or getattr(app, "tasktree_settings", None) or TasktreeSettings()
        self.app = app
        self.settings = settings
        self.redis_url = redis_url or settings.redis_url
        self.queue = queue or settings.queue
        self.batch_size = batch_size or settings.batch_size
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._placements: dict[int, tuple[str, str | None]] = {}
        self._sequence = itertools.count()
        # Publishing is blocking I/O (kombu): one thread does it, in order, while the loop reads completions.
        self._sender = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tasktree-send")

    # -- placement --------------------------------------------------------------------------------------------
    def placement(self, node: Node) -> tuple[str, str | None]:
        """(LOCAL | REMOTE | CONTROL, queue) for a node, from its kind and its `.Remote()` / `.Local()` ancestors."""
        cached = self._placements.get(id(node))
        if cached is None:
            ancestor: Node | None = node
            while ancestor is not None and ancestor.KIND != "Local":
                ancestor = ancestor.parent
            if ancestor is not None:
                cached = (LOCAL, None)
            elif node.KIND == "Remote":
                cached = (REMOTE, getattr(node, "queue", None) or self.queue)
            elif node.SHIPPABLE:
                cached = (REMOTE, self.queue)
            else:
                cached = (CONTROL, None)
            self._placements[id(node)] = cached
        return cached

    # -- executor hooks ---------------------------------------------------------------------------------------
    def execute(self, node: Node, context: Context, tracer: TraceNode) -> Any:
        if context.run_id is None:
            context.run_id = uuid.uuid4().hex
        where, queue = self.placement(node)
        if where != REMOTE:
            return node._impl(context, tracer)
        if node.KIND == "Remote":
            return self._ship_node(node.child(), context, tracer, queue, absorb=False)  # type: ignore[attr-defined]
        return self._ship_node(node, context, tracer, queue, absorb=True)

    async def run_parallel(self, node: ParallelNode, context: Context, tracer: TraceNode) -> list[Result]:
        children = node.children()
        if self.placement(node)[0] == LOCAL:
            return await node.run_local(context)
        state = self._state()
        blackboard = context.blackboard
        _, payload = self._encode(blackboard, node.describe())
        [snapshot] = await self._store(state, [payload])
        units = [
            self._unit(state, context, self._tree_of(child), child.address, None, snapshot, self.queue)
            for child in children
        ]
        progress = node.progress(context, len(units))
        completions = await self._run_units(state, units, node.concurrency_limit, progress)
        branch_changes = []
        for child, completion in zip(children, completions, strict=True):
            self._graft(tracer, completion, name=child.trace_name)
            branch_changes.append((child.trace_name, completion.changes or {}))
        merged = changes.merge(branch_changes)  # a conflict raises: the Parallel FAILs naming field and branches
        if merged:
            changes.apply(blackboard, merged)
        return [self._result(completion) for completion in completions]

    async def run_gather(
        self, node: GatherNode, context: Context, tracer: TraceNode, trees: list[RunnableTree], blackboards: list[Any]
    ) -> list[Result]:
        if self.placement(node)[0] == LOCAL:
            return await node.run_local(context, trees, blackboards)
        state = self._state()
        payloads = []
        for index, (tree, blackboard) in enumerate(zip(trees, blackboards, strict=True)):
            self._check_registered(tree, f"Gather tree {index} ({tree.fullname})")
            payloads.append(self._encode(blackboard, f"{node.describe()}, tree {index} ({tree.fullname})")[1])
        snapshots = await self._store(state, payloads)
        units = [
            self._unit(state, context, tree, None, index, snapshot, self.queue)
            for index, (tree, snapshot) in enumerate(zip(trees, snapshots, strict=True))
        ]
        progress = node.progress(context, len(units))
        completions = await self._run_units(state, units, node.concurrency_limit, progress)
        results = []
        for index, (tree, blackboard, completion) in enumerate(zip(trees, blackboards, completions, strict=True)):
            self._graft(tracer, completion, name=f"{index}_{tree.fullname}")
            if completion.changes:
                changes.apply(blackboard, completion.changes)
            results.append(self._result(completion))
        return results

    # -- shipping ---------------------------------------------------------------------------------------------
    async def _ship_node(
        self, target: Node, context: Context, tracer: TraceNode, queue: str | None, absorb: bool
    ) -> Result:
        state = self._state()
        blackboard = context.blackboard
        _, payload = self._encode(blackboard, target.describe())
        [snapshot] = await self._store(state, [payload])
        unit = self._unit(state, context, self._tree_of(target), target.address, None, snapshot, queue or self.queue)
        [completion] = await self._run_units(state, [unit], 1)
        if absorb:
            self._graft(tracer, completion, into=tracer)
        else:
            self._graft(tracer, completion, name=target.trace_name)
        if completion.changes:
            changes.apply(blackboard, completion.changes)
        return self._result(completion)

    def _tree_of(self, node: Node) -> Tree[Any]:
        name = node.address.split("/", 1)[0]
        try:
            tree = get_tree(name)
        except LookupError:
            tree = None
        if tree is None or tree.nodes.get(node.address) is not node:
            raise DispatchError(
                f"{node.describe()}: its tree is not registered under the name {name!r}; give the tree a unique "
                "name and build it at import time in a module listed in TASKTREE_IMPORTS, so workers build it too"
            )
        return tree

    @staticmethod
    def _check_registered(tree: Tree[Any], what: str) -> None:
        try:
            registered = get_tree(tree.name) if tree.name else None
        except LookupError:
            registered = None
        if registered is not tree:
            raise DispatchError(
                f"{what}: the tree is not the one registered under {tree.name!r}; build Gather's trees once, at "
                "import time, with unique names, in a module listed in TASKTREE_IMPORTS"
            )

    async def _store(self, state: _LoopState, payloads: list[bytes]) -> list[str]:
        try:
            return await store_snapshots(state.redis, payloads, self.settings.snapshot_ttl)
        except (OSError, RedisError) as exc:
            raise DispatchError(
                f"cannot store blackboard snapshots in Redis {maybe_sanitize_url(self.redis_url)} "
                f"(TASKTREE_REDIS_URL): {type(exc).__name__}: {exc}"
            ) from exc

    def _encode(self, blackboard: Any, where: str) -> tuple[Any, bytes]:
        try:
            return encode_blackboard(blackboard, self.settings.max_blackboard_bytes)
        except EncodingError as exc:
            raise DispatchError(f"{where}: cannot ship the blackboard: {exc}") from None

    def _unit(
        self,
        state: _LoopState,
        context: Context,
        tree: Tree[Any],
        address: str | None,
        index: int | None,
        snapshot: str,
        queue: str,
    ) -> Unit:
        run_id = context.run_id or uuid.uuid4().hex
        last = context._last_result
        try:
            last_encoded = encode_value(last, "last result") if last is not None else None
        except EncodingError:
            last_encoded = None  # the previous step's data cannot travel; the unit sees no last result
        where = address or f"{tree.name}[{index}]"
        return Unit(
            run_id=run_id,
            execution_id=f"{run_id}:{where}:{next(self._sequence)}",
            tree=tree.name,
            fingerprint=tree.fingerprint,
            address=address,
            index=index,
            snapshot=snapshot,
            last_result=last_encoded,
            reply_to=state.reply_key,
            queue=queue,
        )

    async def _send(self, units: list[Unit]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._sender, self._publish, units)
        except Exception as exc:  # noqa: BLE001 - kombu/amqp/redis errors alike: the dispatching node FAILs
            broker = maybe_sanitize_url(self.app.conf.broker_url)
            raise DispatchError(
                f"cannot send {len(units)} unit(s) ({units[0].where}...) to the broker {broker} "
                f"(TASKTREE_BROKER_URL), queue {units[0].queue!r}: {type(exc).__name__}: {exc}"
            ) from exc

    def _publish(self, units: list[Unit]) -> None:
        sent_at = time.time()
        for unit in units:
            unit.sent_at = sent_at  # queued_ms counts broker time, not the wait for a concurrency slot
        kwargs = {"tree": units[0].tree, "addresses": [unit.where for unit in units], "run_id": units[0].run_id}
        self.app.send_task(
            "tasktree.execute",
            args=[[unit.model_dump() for unit in units]],
            kwargs=kwargs,
            queue=units[0].queue,
            # what Flower shows; Celery's own saferepr of the units cost ~4 ms per message
            argsrepr=f"[{len(units)} units of {units[0].tree}]",
            kwargsrepr=_clipped(repr(kwargs), REPR_MAX),
        )

    async def _run_units(
        self, state: _LoopState, units: list[Unit], limit: int, progress: ProgressCounter | None = None
    ) -> list[Completion]:
        """Keep at most `limit` units in flight, sending them in batches as slots free up; wait for all."""
        loop = asyncio.get_running_loop()
        entries = [_InFlight(unit, loop.create_future()) for unit in units]
        futures = [entry.future for entry in entries]
        slots = asyncio.Semaphore(limit)
        for entry in entries:
            state.inflight[entry.unit.execution_id] = entry
            entry.future.add_done_callback(lambda _f: slots.release())
            if progress is not None:
                entry.future.add_done_callback(lambda f: f.cancelled() or progress.child_done(f.result().ok))
        self._ensure_reader(state)
        # several units per message (fewer broker round trips), but enough messages to spread over workers
        most = max(1, min(self.batch_size, limit // 4))
        try:
            start = 0
            while start < len(units):
                await slots.acquire()
                taken = 1
                await asyncio.sleep(0)  # completions resolved in this burst free their slots first
                while taken < most and start + taken < len(units) and not slots.locked():
                    await slots.acquire()  # free: returns at once
                    taken += 1
                batch = [unit for unit in units[start : start + taken] if unit.execution_id in state.inflight]
                start += taken
                if batch:
                    await self._send(batch)
            completions = list(await asyncio.gather(*futures))
        except BaseException:
            # gather() cancels the futures it waits on: a cancelled future is a unit still out there.
            unfinished = [u for u, f in zip(units, futures, strict=True) if f.cancelled() or not f.done()]
            await self._abandon(state, unfinished)
            for future in futures:
                future.cancel()
            raise
        for entry, completion in zip(entries, completions, strict=True):
            if entry.lost:
                completion.extra.update(dispatches=entry.unit.dispatch, lost_workers=entry.lost)
        return completions

    async def _abandon(self, state: _LoopState, units: list[Unit]) -> None:
        """The coordinator stopped waiting (Timeout, Terminable, cancellation): tell workers to drop these units."""
        for unit in units:
            state.inflight.pop(unit.execution_id, None)
        if units:
            pipe = state.redis.pipeline(transaction=False)
            for unit in units:
                pipe.set(keys.cancel(unit.execution_id), 1, ex=self.settings.reply_ttl)
            try:
                await asyncio.shield(pipe.execute())
            except Exception:  # noqa: BLE001 - best effort: a late unit's completion is ignored anyway
                pass

    # -- completions ------------------------------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState(self.redis_url)
        return state

    def _ensure_reader(self, state: _LoopState) -> None:
        loop = asyncio.get_running_loop()
        if state.reader is None or state.reader.done():
            state.reader = loop.create_task(self._read(state), name="tasktree-completions")
        if state.watchdog is None or state.watchdog.done():
            state.watchdog = loop.create_task(self._watch_leases(state), name="tasktree-leases")

    async def _read(self, state: _LoopState) -> None:
        """Resolve futures from the reply list; exits as soon as nothing is pending (restarted on demand)."""
        redis = state.redis
        while state.inflight:
            try:
                item = await redis.blpop([state.reply_key], timeout=1)
                if item is None:
                    continue
                raws = [item[1], *(await redis.lpop(state.reply_key, 1000) or [])]
            except (OSError, RedisError) as exc:  # a Redis blip must not orphan every unit in flight
                logger.warning("reading completions failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(0.2)  # back-off, not synchronisation
                continue
            for raw in raws:
                try:
                    completion = Completion.model_validate_json(raw)
                except ValueError as exc:  # a foreign or corrupt message must not stop the reader for every unit
                    logger.error("ignoring an unreadable completion on %s: %s: %.200r", state.reply_key, exc, raw)
                    continue
                state.resolve(completion)

    async def _watch_leases(self, state: _LoopState) -> None:
        """Send again the units whose worker died: taken (a `started` marker) but neither leased nor done."""
        interval = self.settings.lease_ttl / 2
        while state.inflight:
            await asyncio.sleep(interval)  # a polling period, not synchronisation
            ids = list(state.inflight)
            if not ids:
                continue
            pipe = state.redis.pipeline(transaction=True)
            for execution_id in ids:
                pipe.get(keys.started(execution_id))
                pipe.exists(keys.lease(execution_id), keys.done(execution_id))
            try:
                replies = await pipe.execute()
            except (OSError, RedisError) as exc:
                logger.warning("checking unit leases failed (%s: %s)", type(exc).__name__, exc)
                continue
            for i, execution_id in enumerate(ids):
                taker, alive = replies[2 * i], replies[2 * i + 1]
                if taker is not None and not alive:
                    try:
                        await self._redispatch(state, execution_id, taker.decode(errors="replace"))
                    except (OSError, RedisError) as exc:  # checked again next period
                        logger.warning("sending unit %s again failed: %s", execution_id, exc)

    async def _redispatch(self, state: _LoopState, execution_id: str, dead: str) -> None:
        entry = state.inflight.get(execution_id)
        if entry is None:
            return
        unit = entry.unit
        entry.lost.append(dead)
        if unit.dispatch >= self.settings.max_dispatches:
            state.resolve(Completion(  # _run_units adds dispatches and lost_workers, as for any re-sent unit
                execution_id=execution_id, status="FAIL", queue=unit.queue,
                error=f"unit {unit.where}: its worker died while running it ({', '.join(entry.lost)}: the lease "
                f"expired); sent {unit.dispatch} times, giving up "
                f"(TASKTREE_MAX_DISPATCHES={self.settings.max_dispatches})",
            ))
            return
        logger.warning("unit %s: worker %s died running it (lease expired); sending it again", unit.where, dead)
        await state.redis.delete(keys.started(execution_id))
        unit.dispatch += 1
        await self._send([unit])

    # -- results and traces -----------------------------------------------------------------------------------
    @staticmethod
    def _result(completion: Completion) -> Result:
        if completion.error:
            return Result(Status.FAIL, None)
        return Result(Status.OK if completion.ok else Status.FAIL, decode_value(completion.data))

    @staticmethod
    def _graft(parent: TraceNode, completion: Completion, name: str = "", into: TraceNode | None = None) -> None:
        if into is not None:
            node = into
            if completion.trace:
                node.absorb(completion.trace)
        elif completion.trace:
            node = parent.graft(TraceNode.from_fragment(completion.trace))
        else:
            node = parent.add_child(name or "unit", "Unit")
            node.set_end(Result(Status.FAIL, None))
        node.attributes.update(
            worker=completion.worker, pid=completion.pid, celery_task_id=completion.celery_task_id,
            queue=completion.queue, queued_ms=completion.queued_ms, worker_run_ms=completion.run_ms,
            **completion.extra,
        )
        if completion.error:
            node.error(completion.error)
            node.attributes["error"] = completion.error

    async def aclose(self) -> None:
        """Stop the completion reader and close Redis for the running loop."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is None:
            return
        tasks = [task for task in (state.reader, state.watchdog) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await state.redis.delete(state.reply_key)
        except (OSError, RedisError) as exc:  # Redis is down: the reply list expires by its TTL
            logger.warning("could not delete %s: %s", state.reply_key, exc)
        await state.redis.aclose()

    def __repr__(self) -> str:
        return f"CeleryExecutor(queue={self.queue!r}, broker={self.app.conf.broker_url!r})"
