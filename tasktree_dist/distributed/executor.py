"""CeleryExecutor: the coordinator side of distributed execution.

Control flow (Sequence, Selector, If, While, Retry, Timeout, Cacher...) runs here. Work is shipped as units:
Function and LLM leaves, each Parallel child and each Gather tree (whole, on one worker), and whatever sits under
`.Remote(queue=...)`; `.Local()` keeps a subtree here. Units carry ids only; blackboards go through Redis.

Every top-level `await tree(context)` is a recorded run (runs.scope): its id is in `context.run_id`, its record,
events and trace are in Redis while it goes. A unit's execution id is deterministic (run id, node address and
the position of its trace node: Gather/Parallel index, loop iteration, retry attempt), so a coordinator that
replays the run finds the unit's recorded completion instead of sending it again.

Completions are applied as they arrive: a Gather child's blackboard changes and trace as soon as it finishes,
so a Timeout or cancel around remote work keeps everything that finished before it, as in-process execution does.
Parallel branches share one blackboard, so theirs are merged in branch order when the fan-out ends (stopped or
not), which keeps a replay's blackboard identical to the original's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from ..core.progress import ProgressCounter, progress_for
from ..core.registry import get_tree
from ..core.result import Result, Status
from ..core.serde import EncodingError, decode_value, encode_value
from ..core.settings import TasktreeSettings
from ..core.trace import PagedChildren, TraceNode
from ..nodes.wait import waits_in
from . import changes
from .dispatch import Dispatcher, DispatchError, Prepared
from .liveness import process_heartbeat
from .protocol import Completion, Unit
from .runs_interface import RunLedger, RunLedgerError, runs_provider
from .snapshots import encode_blackboard, snapshot_key

if TYPE_CHECKING:
    from ..core.context import Context
    from ..core.executor import GatherNode, ParallelNode, RunnableTree
    from ..core.signals import Signal, WaitRequest
    from ..nodes.base import Node

LOCAL, REMOTE, CONTROL = "local", "remote", "control"
#: Longest argument text a message carries for Flower and logs (Celery's own limit).
REPR_MAX = 1024
#: Failed children of a large fan-out kept in the coordinator's trace beyond TASKTREE_TRACE_FANOUT_MAX.
FAILED_KEPT = 100

__all__ = ["CeleryExecutor", "DispatchError"]


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        if redis_url is not None and redis_url != settings.redis_url:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.app = app
        self.settings = settings
        self.redis_url = settings.redis_url
        self.queue = queue or settings.queue
        self.batch_size = batch_size or settings.batch_size
        self._dispatchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Dispatcher] = (
            weakref.WeakKeyDictionary()
        )
        self._scopes: dict[str, RunLedger] = {}
        # Publishing is blocking I/O (kombu): one thread does it, in order, while the loop reads completions.
        self._sender = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tasktree-send")

    # -- placement --------------------------------------------------------------------------------------------
    def placement(self, node: Node) -> tuple[str, str | None]:
        """(LOCAL | REMOTE | CONTROL, queue) for a node, from its kind and its `.Remote()` / `.Local()` ancestors.

        A property of the built tree: kept on the node itself (never keyed by id(), which a rebuilt tree reuses)."""
        cached = node.__dict__.get("_tasktree_placement")
        if cached is None:
            ancestor: Node | None = node
            while ancestor is not None and ancestor.KIND != "Local":
                ancestor = ancestor.parent
            if ancestor is not None:
                cached = (LOCAL, None)
            elif node.KIND == "Remote":
                cached = (REMOTE, getattr(node, "queue", None))
            elif node.SHIPPABLE:
                cached = (REMOTE, None)
            else:
                cached = (CONTROL, None)
            node.__dict__["_tasktree_placement"] = cached
        where, queue = cached
        return where, (queue or self.queue) if where == REMOTE else None

    # -- runs -------------------------------------------------------------------------------------------------
    async def run_scope(
        self, tree: RunnableTree, context: Context, body: Callable[[], Awaitable[Result]]
    ) -> Result:
        """A top-level `await tree(context)`: record the run (or attach to the claimed one) and drive it."""
        dispatcher = self._dispatcher()
        root = context.trace_root()
        try:
            heartbeat = await asyncio.to_thread(process_heartbeat, self.redis_url, self.settings.lease_ttl)
            scope = await runs_provider().open_run(dispatcher.redis, tree, context, root, heartbeat.process_id,
                                                   dispatcher.reply_key, self.settings)
        except Exception as exc:  # noqa: BLE001 - Redis unreachable, run owned elsewhere: the run FAILs, named
            message = str(exc) if isinstance(exc, RunLedgerError) else (
                f"cannot record the run in Redis {maybe_sanitize_url(self.redis_url)} (TASKTREE_REDIS_URL): "
                f"{type(exc).__name__}: {exc}")
            tracer = root.add_child(tree.fullname, "Tree")
            tracer.error(message)
            tracer.attributes["error"] = message
            result = Result(Status.FAIL, None)
            tracer.set_end(result)
            root.set_end(result)
            return result
        self._scopes[scope.run_id] = scope
        try:
            return await scope.drive(body, context)
        finally:
            self._scopes.pop(scope.run_id, None)

    def _scope(self, context: Context) -> RunLedger:
        scope = self._scopes.get(context.run_id or "")
        if scope is None:
            raise DispatchError(
                "no run is recorded for this context: start distributed work with `await tree(context)` "
                f"(context.run_id={context.run_id!r})"
            )
        return scope

    # -- executor hooks ---------------------------------------------------------------------------------------
    def execute(self, node: Node, context: Context, tracer: TraceNode) -> Any:
        where, queue = self.placement(node)
        if where != REMOTE:
            return node._impl(context, tracer)
        if node.KIND == "Remote":
            return self._ship_node(node.child(), context, tracer, queue, absorb=False)  # type: ignore[attr-defined]
        return self._ship_node(node, context, tracer, queue, absorb=True)

    async def run_parallel(self, node: ParallelNode, context: Context, tracer: TraceNode) -> list[Result]:
        if self.placement(node)[0] == LOCAL or waits_in(node):  # type: ignore[arg-type]
            return await node.run_local(context)  # a branch that waits stays here (it may park); its work ships
        scope = self._scope(context)
        children = node.children()
        blackboard = context.blackboard
        payload = self._encode(blackboard, node.describe())  # type: ignore[attr-defined]
        snapshot = snapshot_key(scope.run_id, payload)
        position = tracer.position()
        slots: list[TraceNode | None] = [None] * len(children)
        completions: dict[int, Completion] = {}

        def prepare(i: int) -> Prepared:
            child = children[i]
            slots[i] = tracer.add_child(child.trace_name, child.KIND)
            unit = self._unit(context, scope, self._tree_of(child), child.address, None, snapshot, self.queue,
                              f"{child.address}@{position}.{i}")
            return Prepared(unit, payload)

        def done(i: int, completion: Completion) -> None:
            completions[i] = completion
            scope.dirty = True

        def keep_arrived() -> None:
            """In branch order, also when stopped early: what finished is kept, the same way a replay applies it."""
            arrived = sorted(completions.items())
            for i, completion in arrived:
                completion.fill(slots[i])  # type: ignore[arg-type]
                scope.unit_alerts(completion, slots[i])  # type: ignore[arg-type]
            merged = changes.merge([(children[i].trace_name, c.changes or {}) for i, c in arrived])
            if merged:
                changes.apply(blackboard, merged)

        scope.planned += len(children)
        try:
            await self._dispatcher().run_units(scope, len(children), prepare, node.concurrency_limit, done,
                                               self._progress(context, scope, node, len(children)), self.batch_size)
        except BaseException:
            try:
                keep_arrived()
            except Exception as exc:  # noqa: BLE001 - the stop that is under way is what the caller must see
                tracer.log(f"finished branches not applied: {exc}", "warning")
            raise
        keep_arrived()  # a conflict raises here: the Parallel FAILs naming field and branches
        return [self._result(completions[i]) for i in range(len(children))]

    async def run_gather(
        self,
        node: GatherNode,
        context: Context,
        tracer: TraceNode,
        trees: list[RunnableTree],
        blackboards: list[Any],
    ) -> list[Result]:
        if self.placement(node)[0] == LOCAL or any(waits_in(tree.root) for tree in trees):  # type: ignore[arg-type]
            return await node.run_local(context, trees, blackboards)  # trees that wait stay here; their work ships
        scope = self._scope(context)
        for index, tree in enumerate(trees):
            self._check_registered(tree, f"Gather tree {index} ({tree.fullname})")
        position = tracer.position()
        describe = node.describe()  # type: ignore[attr-defined]
        slots: dict[int, TraceNode] = {}
        results: list[Result | None] = [None] * len(trees)
        keep = self.settings.trace_fanout_max or len(trees)
        if len(trees) > keep:
            tracer.paged = PagedChildren(len(trees), keep, f"{scope.run_id}:{node.address}[{{i}}]@{position}")

        def prepare(i: int) -> Prepared:
            tree = trees[i]
            payload = self._encode(blackboards[i], f"{describe}, tree {i} ({tree.fullname})")
            if i < keep:
                slots[i] = tracer.add_child(f"{i}_{tree.fullname}", "Tree")
            unit = self._unit(context, scope, tree, None, i, snapshot_key(scope.run_id, payload), self.queue,
                              f"{node.address}[{i}]@{position}", reply_trace=i < keep)
            return Prepared(unit, payload)

        def done(i: int, completion: Completion) -> None:
            if i < keep:
                slot = slots.pop(i)
                completion.fill(slot)
                scope.unit_alerts(completion, slot)
                scope.dirty = True
            elif self._page_out(scope, tracer, f"{i}_{trees[i].fullname}", completion):
                scope.dirty = True  # (a paged child changes only counts: the trace is not written again for it)
            if completion.changes:
                changes.apply(blackboards[i], completion.changes)
            results[i] = self._result(completion)

        scope.planned += len(trees)
        await self._dispatcher().run_units(scope, len(trees), prepare, node.concurrency_limit, done,
                                           self._progress(context, scope, node, len(trees)), self.batch_size)
        return results  # type: ignore[return-value]

    @staticmethod
    def _page_out(scope: RunLedger, fanout: TraceNode, name: str, completion: Completion) -> bool:
        """A child past the fan-out's first ones: counted (cost, tokens), its trace left in its unit record; a
        failed one joins the trace (up to FAILED_KEPT), where the run's error and the runs board find it. Returns
        whether it joined the trace."""
        paged = fanout.paged
        assert paged is not None
        kept = not completion.ok and paged.failed < FAILED_KEPT
        if completion.totals is not None and not kept:  # a slim reply: totals and alerts, no trace
            if completion.alerts:
                scope.unit_alerts(completion, TraceNode(name, "Tree", fanout))
            paged.add(float(completion.totals.get("cost") or 0.0), completion.totals.get("tokens") or {})
            return False
        node = TraceNode(name, "Tree", fanout)
        completion.fill(node)
        scope.unit_alerts(completion, node)
        if kept:
            paged.failed += 1
            fanout._children.append(node)
        else:
            paged.add(node.total_cost(), node.total_tokens())  # a full record (a replay, an older worker)
        return kept

    # -- waits ------------------------------------------------------------------------------------------------
    async def wait_for_signal(self, context: Context, tracer: TraceNode, request: WaitRequest) -> Signal | None:
        """A WaitFor in a recorded run: answered from its record, an early signal, a signal or its deadline; the
        run parks while nothing but waits remains (runs.waits)."""
        scope = self._scope(context)
        dispatcher = self._dispatcher()
        execution_id = f"{scope.run_id}:{request.address}@{tracer.position()}"
        return await scope.wait_for_signal(dispatcher, execution_id, request)

    # -- shipping ---------------------------------------------------------------------------------------------
    async def _ship_node(
        self, target: Node, context: Context, tracer: TraceNode, queue: str | None, absorb: bool
    ) -> Result:
        scope = self._scope(context)
        blackboard = context.blackboard
        payload = self._encode(blackboard, target.describe())
        outcome: list[Completion] = []

        def prepare(_: int) -> Prepared:
            where = tracer if absorb else tracer.add_child(target.trace_name, target.KIND)
            unit = self._unit(context, scope, self._tree_of(target), target.address, None,
                              snapshot_key(scope.run_id, payload), queue or self.queue,
                              f"{target.address}@{where.position()}")
            slot.append(where)
            return Prepared(unit, payload)

        def done(_: int, completion: Completion) -> None:
            outcome.append(completion)
            completion.fill(slot[0], absorb=absorb)
            scope.unit_alerts(completion, slot[0])
            if completion.changes:
                changes.apply(blackboard, completion.changes)
            scope.dirty = True

        slot: list[TraceNode] = []
        scope.planned += 1
        await self._dispatcher().run_units(scope, 1, prepare, 1, done)
        return self._result(outcome[0])

    def _progress(self, context: Context, scope: RunLedger, node: Any, total: int) -> ProgressCounter | None:
        user = context.on_progress

        def both(event: Any) -> None:
            scope.progress(event)
            if user is not None:
                user(event)

        return progress_for(both, node.address or node.fullname, total)

    def _tree_of(self, node: Node) -> Any:
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
    def _check_registered(tree: Any, what: str) -> None:
        try:
            registered = get_tree(tree.name) if tree.name else None
        except LookupError:
            registered = None
        if registered is not tree:
            raise DispatchError(
                f"{what}: the tree is not the one registered under {tree.name!r}; build Gather's trees once, at "
                "import time, with unique names, in a module listed in TASKTREE_IMPORTS"
            )

    def _encode(self, blackboard: Any, where: str) -> bytes:
        try:
            return encode_blackboard(blackboard, self.settings.max_blackboard_bytes)[1]
        except EncodingError as exc:
            raise DispatchError(f"{where}: cannot ship the blackboard: {exc}") from None

    def _unit(
        self,
        context: Context,
        scope: RunLedger,
        tree: Any,
        address: str | None,
        index: int | None,
        snapshot: str,
        queue: str,
        execution: str,
        reply_trace: bool = True,
    ) -> Unit:
        last = context._last_result
        try:
            last_encoded = encode_value(last, "last result") if last is not None else None
        except EncodingError:
            last_encoded = None  # the previous step's data cannot travel; the unit sees no last result
        return Unit(
            run_id=scope.run_id,
            execution_id=f"{scope.run_id}:{execution}",
            tree=tree.name,
            fingerprint=tree.fingerprint,
            address=address,
            index=index,
            snapshot=snapshot,
            last_result=last_encoded,
            reply_to=self._dispatcher().reply_key,
            queue=queue,
            reply_trace=reply_trace,
        )

    def _publish(self, units: list[Unit]) -> None:
        """Send one message of units (on the sender thread: kombu's socket I/O blocks)."""
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

    def _dispatcher(self) -> Dispatcher:
        loop = asyncio.get_running_loop()
        dispatcher = self._dispatchers.get(loop)
        if dispatcher is None:
            dispatcher = self._dispatchers[loop] = Dispatcher(
                self.settings, self.app.conf.broker_url, self._publish, self._sender
            )
        return dispatcher

    # -- results and traces -----------------------------------------------------------------------------------
    @staticmethod
    def _result(completion: Completion) -> Result:
        if completion.error:
            return Result(Status.FAIL, None)
        return Result(Status.OK if completion.ok else Status.FAIL, decode_value(completion.data))

    async def aclose(self) -> None:
        """Stop the completion reader and close Redis for the running loop."""
        dispatcher = self._dispatchers.pop(asyncio.get_running_loop(), None)
        if dispatcher is not None:
            await dispatcher.aclose()

    def __repr__(self) -> str:
        return f"CeleryExecutor(queue={self.queue!r}, broker={maybe_sanitize_url(self.app.conf.broker_url)!r})"

