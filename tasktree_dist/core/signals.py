"""Signals: what answers a WaitFor. The payload schema, a wait as the executor sees it, and the in-process mailbox.

A WaitFor asks its context's executor to wait (`executor.wait_for_signal(context, tracer, request)`): in-process
the context's Mailbox answers it (`await context.signal(name, payload)` from any task of that loop); the
distributed executor records the wait in Redis, where a signal from any process answers it, and a run whose
remaining work is only waits parks (holding no process) until one does.

A payload is checked against the wait's schema before it is accepted: a pydantic model class (the wait returns
an instance), a JSON Schema dict (checked valid when the tree is built; the wait returns plain JSON) or None (any
JSON value). The refusal names the field, so a person answering a form or a webhook author knows what to fix.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import SignalError, TasktreeProgrammingError


class _NoDefault:
    def __repr__(self) -> str:
        return "<no default>"


#: WaitFor's `default` when none is given: a timeout FAILs with WaitTimeout.
NO_DEFAULT: Any = _NoDefault()


def _where(path: Any) -> str:
    return "/".join(str(part) for part in path) or "(the payload itself)"


class PayloadSchema:
    """A wait's payload contract: `check(payload)` returns the value the wait returns, or raises SignalError."""

    def __init__(self, schema: Any = None) -> None:
        self.model: Any = None
        self.json_schema: dict[str, Any] | None = None
        if schema is None:
            return
        if isinstance(schema, type) and hasattr(schema, "model_validate") and hasattr(schema, "model_json_schema"):
            self.model = schema
            self.json_schema = schema.model_json_schema()
            return
        if isinstance(schema, dict):
            from .json_schemas import SchemaProblem, check_schema

            try:
                check_schema(schema)  # valid, and self-contained: a remote $ref is never fetched
            except SchemaProblem as exc:
                raise TasktreeProgrammingError(
                    f"schema is not a valid JSON Schema: {exc} (at {_where(exc.path)})"
                ) from None
            self.json_schema = schema
            return
        raise TasktreeProgrammingError(
            f"schema must be a pydantic model class, a JSON Schema dict or None, got {type(schema).__name__}"
        )

    @property
    def name(self) -> str:
        return self.model.__name__ if self.model is not None else "JSON Schema" if self.json_schema else "any JSON"

    def check(self, payload: Any, what: str) -> Any:
        """The payload as the wait returns it (a model instance for a pydantic schema); SignalError naming the
        field that does not fit, prefixed by `what` (the wait and run)."""
        try:
            orjson.dumps(payload)
        except TypeError as exc:
            raise SignalError(f"{what}: the payload is not JSON: {exc}") from None
        if self.model is not None:
            from pydantic import ValidationError

            try:
                return self.model.model_validate(payload)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise SignalError(
                    f"{what}: payload does not fit {self.model.__name__}: {_where(first['loc'])}: {first['msg']}"
                    + (f" ({exc.error_count()} errors)" if exc.error_count() > 1 else "")
                ) from None
        if self.json_schema is not None:
            check_against_json_schema(self.json_schema, payload, what)
        return payload

    def to_json(self, value: Any) -> Any:
        """A checked value back to plain JSON (what is recorded)."""
        if self.model is not None and isinstance(value, self.model):
            return value.model_dump(mode="json")
        return value


def check_against_json_schema(schema: dict[str, Any] | None, payload: Any, what: str) -> None:
    """Check a payload against a recorded JSON Schema (a process that has no WaitFor node at hand)."""
    if schema:
        from .json_schemas import SchemaProblem, errors

        try:
            found = errors(schema, payload)
        except SchemaProblem as exc:
            raise SignalError(f"{what}: the wait's schema cannot be used: {exc}") from None
        if found:
            raise SignalError(f"{what}: payload does not fit the schema: {_where(found[0].absolute_path)}: "
                              f"{found[0].message}")


@dataclass
class WaitRequest:
    """A reached wait, as the executor records and answers it."""

    name: str
    #: The WaitFor's address (tree name + path) and its schema.
    address: str
    schema: PayloadSchema
    prompt: Any = None
    timeout_s: float | None = None
    #: Whether a timeout returns a default (a timeout without one FAILs the wait: a retry waits again).
    has_default: bool = False
    #: Set by the executor: when the wait was first reached and its absolute deadline (epoch seconds).
    since: float = 0.0
    deadline: float | None = None


@dataclass
class Signal:
    """The answer to a wait: its payload (plain JSON, checked), the signal's id and when it was recorded."""

    name: str
    payload: Any
    signal_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    at: float = field(default_factory=time.time)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "payload": self.payload, "signal_id": self.signal_id, "at": self.at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signal:
        return cls(data.get("name", ""), data.get("payload"), str(data.get("signal_id", "")),
                   float(data.get("at") or 0.0))


class Mailbox:
    """In-process signals for one context (shared by its forks): a signal answers the oldest wait of its name, or
    is kept until a wait of that name is reached; a signal id is recorded once."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[tuple[asyncio.Future[Signal], WaitRequest]]] = {}
        self._early: dict[str, deque[Signal]] = {}
        self._ids: set[str] = set()

    def signal(self, name: str, payload: Any, signal_id: str | None = None) -> bool:
        """Deliver (or keep) a signal; False when its id was already recorded. SignalError if the payload does not
        fit the schema of the wait it answers (an early signal is checked when its wait is reached)."""
        if not isinstance(name, str) or not name:
            raise SignalError(f"signal name must be a non-empty string, got {name!r}", "name")
        if signal_id is not None and signal_id in self._ids:
            return False
        waiters = self._waiting.get(name)
        while waiters and waiters[0][0].done():
            waiters.popleft()
        if waiters:
            future, request = waiters[0]
            checked = request.schema.check(payload, f"wait {name!r} ({request.address})")
            payload = request.schema.to_json(checked)
            waiters.popleft()
            future.set_result(Signal(name, payload, signal_id or uuid.uuid4().hex))
        else:
            self._early.setdefault(name, deque()).append(Signal(name, payload, signal_id or uuid.uuid4().hex))
        if signal_id is not None:
            self._ids.add(signal_id)
        return True

    async def wait(self, request: WaitRequest) -> Signal | None:
        """The signal for `request`, or None when its timeout passed first."""
        request.since = time.time()
        if request.timeout_s is not None:
            request.deadline = request.since + request.timeout_s
        early = self._early.get(request.name)
        if early:
            return early.popleft()
        future: asyncio.Future[Signal] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(request.name, deque()).append((future, request))
        try:
            return await asyncio.wait_for(future, request.timeout_s) if request.timeout_s is not None else await future
        except TimeoutError:
            return None
        finally:
            if not future.done():
                future.cancel()

    def pending(self) -> list[WaitRequest]:
        return [request for waiters in self._waiting.values() for future, request in waiters if not future.done()]
