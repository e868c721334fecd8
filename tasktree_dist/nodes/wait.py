"""WaitFor: a leaf that waits for a signal (a person's answer, a webhook, an event) or a deadline.

The node resolves its wait (name, prompt, schema) and asks its context's executor to wait; it knows nothing of
where the signal comes from. In-process the context's mailbox answers (`await context.signal(name, payload)`); in
the fleet the wait is recorded in Redis and a run that has nothing left but waits parks, holding no process (see
distributed.waits and runs.waits).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.callables import adapt, callable_name, resolve
from ..core.errors import TasktreeError, TasktreeProgrammingError, WaitTimeout
from ..core.result import Result, Status
from ..core.signals import NO_DEFAULT, PayloadSchema, Signal, WaitRequest
from ..core.trace import Tracer
from .base import LeafNode, Node

if TYPE_CHECKING:
    from ..core.context import Context

#: Longest signal name (it becomes part of Redis fields and URLs).
NAME_MAX = 200


class WaitNameError(TasktreeError):
    """A WaitFor's name factory raised or returned something that is not a usable name."""


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > NAME_MAX or any(c in name for c in "\n\r\0"):
        raise WaitNameError(f"{where}: the wait name must be a non-empty string of at most {NAME_MAX} characters "
                            f"without line breaks, got {name!r}")
    return name


class WaitFor(LeafNode):
    """Waits for the signal `name` (a string or `(b) -> str`) and returns OK(payload), checked against `schema`.

    After `timeout_s` (from when the wait was first reached): OK(default) when a default is given, else
    FAIL(WaitTimeout). `prompt` (a string or `(b) -> str | dict`) is shown to whoever answers."""

    KIND: ClassVar[str] = "WaitFor"

    def __init__(
        self,
        name: str | Callable[[Any], str],
        schema: Any = None,
        timeout_s: float | None = None,
        default: Any = NO_DEFAULT,
        prompt: str | Callable[[Any], Any] | None = None,
    ) -> None:
        self.wait_name = name
        super().__init__()
        if callable(name):
            self._name_factory: Callable[..., Any] | None = adapt(name, (0, 1), f"{self.KIND}({self.name})")
        else:
            self._name_factory = None
            try:
                check_name(name, f"{self.KIND}({name!r})")
            except WaitNameError as exc:
                raise TasktreeProgrammingError(str(exc)) from None
        try:
            self.schema = PayloadSchema(schema)
        except TasktreeError as exc:
            raise self.programming_error(str(exc)) from None
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float)
                                      or not timeout_s > 0):
            raise self.programming_error(
                f"timeout_s must be a number of seconds > 0 (a deadline in the past never waits), got {timeout_s!r}")
        self.timeout_s = float(timeout_s) if timeout_s is not None else None
        self.default = default
        self.prompt = prompt
        self._prompt_factory = adapt(prompt, (0, 1), self.fullname) if callable(prompt) else None
        if self.schema.model is not None:
            from ..core.serde import register_type

            register_type(self.schema.model)

    def default_name(self) -> str:
        return self.wait_name if isinstance(self.wait_name, str) else callable_name(self.wait_name)

    @property
    def static_name(self) -> str | None:
        """The signal name when it is fixed (None when a factory makes it per blackboard)."""
        return None if self._name_factory is not None else self.wait_name  # type: ignore[return-value]

    def OnBuildEnd(self) -> None:  # noqa: N802
        super().OnBuildEnd()
        ancestor = self.parent
        while ancestor is not None:
            if ancestor.KIND == "Remote":
                raise self.programming_error(
                    "a WaitFor cannot run under .Remote(): a worker cannot park; keep the wait in the coordinator "
                    "(put .Remote() around the work before or after it)")
            ancestor = ancestor.parent

    def static_params(self) -> dict[str, Any]:
        return {"name": self.static_name or "<factory>", "schema": self.schema.json_schema,
                "timeout_s": self.timeout_s, "has_default": self.default is not NO_DEFAULT}

    async def request(self, context: Context) -> WaitRequest:
        """The wait as reached on this blackboard: its resolved name and prompt."""
        b = context.blackboard
        name = self.wait_name
        if self._name_factory is not None:
            try:
                name = await resolve(self._name_factory(b))
            except Exception as exc:  # noqa: BLE001 - named, becomes this node's FAIL
                raise WaitNameError(f"{self.describe()}: the wait name factory raised {type(exc).__name__}: "
                                    f"{exc}") from None
        name = check_name(name, self.describe())
        prompt = await resolve(self._prompt_factory(b)) if self._prompt_factory is not None else self.prompt
        return WaitRequest(name, self.address, self.schema, prompt, self.timeout_s, self.default is not NO_DEFAULT)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        request = await self.request(context)
        tracer.attributes.update(wait=request.name)
        if request.prompt is not None:
            tracer.attributes["prompt"] = request.prompt
        waiter = getattr(context.executor, "wait_for_signal", None)
        signal: Signal | None = await (waiter(context, tracer, request) if waiter is not None
                                       else context.mailbox.wait(request))
        since = request.since or tracer.started
        if signal is None:
            deadline = request.deadline or since + (self.timeout_s or 0.0)
            when = _dt.datetime.fromtimestamp(deadline, _dt.UTC).isoformat(timespec="seconds")
            tracer.attributes.update(timed_out=True, deadline=deadline,
                                     waited_ms=round(max(0.0, time.time() - since) * 1000, 1))
            if self.default is not NO_DEFAULT:
                tracer.log(f"wait {request.name!r}: no signal by {when}; returning the default", "info")
                return Result(Status.OK, self.default)
            raise WaitTimeout(f"{self.describe()}: wait {request.name!r} timed out: no signal by its deadline {when}")
        value = self.schema.check(signal.payload, f"{self.describe()}: wait {request.name!r}")
        tracer.attributes.update(payload=signal.payload, signal_id=signal.signal_id, signalled_at=signal.at,
                                 waited_ms=round(max(0.0, signal.at - since) * 1000, 1))
        return Result(Status.OK, value)


def waits_in(node: Node) -> bool:
    """Whether a WaitFor sits in `node`'s subtree (cached on the node: a property of the built tree)."""
    cached = node.__dict__.get("_tasktree_waits")
    if cached is None:
        cached = node.KIND == "WaitFor" or any(waits_in(child) for child in node.children())
        node.__dict__["_tasktree_waits"] = cached
    return cached


def wait_catalogue(root: Node) -> tuple[list[WaitFor], bool]:
    """Every WaitFor a tree can reach (through Subtrees too), and whether it may reach others: a Gather runs trees
    chosen at run time, so its waits are only known when reached ("open")."""
    waits: list[WaitFor] = []
    open_ = False
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, WaitFor):
            waits.append(node)
        elif node.KIND == "Gather":
            open_ = True
        sub = getattr(node, "tree", None) if node.KIND == "Subtree" else None
        if sub is not None and getattr(sub, "root", None) is not None and id(sub) not in seen:
            seen.add(id(sub))
            stack.append(sub.root)
        stack.extend(reversed(node.children()))
    return waits, open_
