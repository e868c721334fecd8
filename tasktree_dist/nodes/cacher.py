"""Cacher: the child's OK data cached in a key-value store, with tinytasktree's trace (logs and attributes).

Expiries below a second are honoured: whole seconds go to the store as `ex` (every store takes that), a fraction
as `px` milliseconds where the store's `set` takes it (Redis, whose `ex` is whole seconds only), else as float
`ex` seconds (tinytasktree's CacheStore protocol allows floats).
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.callables import adapt, callable_name, resolve, value_or_factory
from ..core.result import Result, Status
from ..core.serde import decode_value, encode_value
from ..core.store import CacheStore, seconds_of
from ..core.trace import Tracer
from .base import DecoratorNode, Node
from .decorators import is_number, require_store

if TYPE_CHECKING:
    from ..core.context import Context

Expiration = int | float | _dt.timedelta | tuple[Any, Any] | None


def expiration_seconds(expiration: Expiration) -> float | None:
    """Seconds until expiry: a number, a timedelta, or a random pick in a (min, max) range to spread expiries
    (whole seconds when both ends are whole)."""
    if expiration is None:
        return None
    if isinstance(expiration, tuple | list):
        low, high = (seconds_of(v) for v in expiration)
        if low.is_integer() and high.is_integer():
            return float(random.randint(int(low), int(high)))
        return random.uniform(low, high)
    return seconds_of(expiration)


def expiry_arguments(seconds: float | None, takes_px: bool) -> dict[str, Any]:
    """The store's `set()` keywords for an expiry of `seconds` (see the module docstring)."""
    if seconds is None:
        return {}
    if seconds.is_integer():
        return {"ex": int(seconds)}
    if takes_px:
        return {"px": max(1, round(seconds * 1000))}
    return {"ex": seconds}


def takes_px(store: Any) -> bool:
    try:
        return "px" in inspect.signature(store.set).parameters
    except (TypeError, ValueError):  # a builtin or C method without a signature
        return False


def check_expiration(node: Node, expiration: Any) -> None:
    def positive(value: Any) -> bool:
        return (isinstance(value, _dt.timedelta) or is_number(value)) and seconds_of(value) > 0

    if expiration is None:
        return
    if isinstance(expiration, tuple | list):
        ok = len(expiration) == 2 and all(map(positive, expiration))
        ok = ok and seconds_of(expiration[0]) <= seconds_of(expiration[1])
    else:
        ok = positive(expiration)
    if not ok:
        raise node.programming_error(
            f"expiration must be seconds > 0, a timedelta, or a (min, max) range of them, got {expiration!r}"
        )


def _seconds_shown(seconds: float) -> int | float:
    return int(seconds) if seconds.is_integer() else seconds


class Cacher(DecoratorNode):
    """Caches the child's OK data under `key_func(b)` in `store` (the key is used as given).

    With `value_validator`, an entry is a hit only when `str(validator(b))` equals the value stored with it; a
    stale entry is deleted. Entries are JSON (never pickle), typed through `tasktree_dist.core.serde`, so any process
    can read what another wrote and a poisoned cache cannot run code. The trace says what happened: the logs
    `cache hit` / `cache miss` / `cache set` / `cache disabled`, and the attributes `cache_key`, `cache_enabled`,
    `cache_status`, `cache_hit`, `cache_validation`, `cache_validation_stored`, `cache_written`.
    """

    KIND: ClassVar[str] = "Cacher"

    def __init__(
        self,
        key_func: Callable[[Any], str],
        store: CacheStore | None = None,
        expiration: Expiration = _dt.timedelta(hours=1),
        value_validator: Callable[..., Any] | None = None,
        enabled: bool | Callable[[Any], bool] = True,
        name: str = "",
    ) -> None:
        super().__init__(name=name)
        self.store = require_store(self, store, ("get", "set", "delete"))
        if not callable(key_func):
            raise self.programming_error(f"key_func must be callable, got {key_func!r}")
        check_expiration(self, expiration)
        self.key_func, self.expiration = key_func, expiration
        self.value_validator, self.enabled = value_validator, enabled
        self._key = adapt(key_func, (1,), f"{self.fullname} key_func")
        self._validator = (
            adapt(value_validator, (1, 2), f"{self.fullname} value_validator") if value_validator is not None else None
        )
        self._enabled = value_or_factory(enabled, f"{self.fullname} enabled", (1,))
        self._takes_px = takes_px(self.store)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        blackboard = context.blackboard
        key = await resolve(self._key(blackboard))
        enabled = bool(await resolve(self._enabled(blackboard)))
        tracer.update_attributes(cache_key=key, cache_enabled=enabled)
        validation = ""
        if self._validator is not None:
            validation = str(await resolve(self._validator(blackboard, tracer)))
            tracer.update_attributes(cache_validation=validation)
        if not enabled:
            tracer.update_attributes(cache_status="disabled", cache_hit=False)
            tracer.log("cache disabled")
            return await self.child()(context)
        cached = await self._read(key, validation, tracer)
        if cached is not None:
            return cached
        result = await self.child()(context)
        if result.is_ok():
            await self._write(key, validation, result.data, tracer)
        return result

    async def _read(self, key: str, validation: str, tracer: Tracer) -> Result | None:
        """The cached result, or None (a miss, an invalidated entry, which is deleted, or an unreadable one)."""
        payload = await self.store.get(key)
        if not payload:
            tracer.update_attributes(cache_status="miss", cache_hit=False)
            tracer.log(f"cache miss, key: {key}")
            return None
        try:
            entry = json.loads(payload)
            stored = str(entry.get("validation", ""))
            value = decode_value(entry["value"]) if stored == validation else None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            tracer.update_attributes(cache_status="decode_error", cache_hit=False)
            tracer.log(f"unreadable cache entry under {key!r}: {exc} => miss", "warning")
            return None
        if stored != validation:
            tracer.update_attributes(cache_status="invalidated", cache_hit=False, cache_validation_stored=stored)
            tracer.log(f"cache key found, but validation value changed: {stored} (expect: {validation}) => "
                       f"deleting key {key}")
            await self.store.delete(key)
            return None
        tracer.update_attributes(cache_status="hit", cache_hit=True)
        tracer.log(f"cache hit, key: {key}" + (f", validation: {validation}" if self._validator else ""))
        return Result(Status.OK, value)

    async def _write(self, key: str, validation: str, data: Any, tracer: Tracer) -> None:
        try:
            payload = json.dumps({"value": encode_value(data), "validation": validation})
        except (TypeError, ValueError) as exc:
            tracer.log(f"result not cached: {exc}", "warning")
            return
        seconds = expiration_seconds(self.expiration)
        await self.store.set(key, payload, **expiry_arguments(seconds, self._takes_px))
        shown = None if seconds is None else _seconds_shown(seconds)
        tracer.update_attributes(cache_written=True, cache_expires_in_secs=shown)
        expiry = "no expiry" if shown is None else f"ex: {shown}s"
        tracer.log(f"cache set (on ok), {expiry}" + (f", validation: {validation}" if self._validator else ""))

    def static_params(self) -> dict[str, Any]:
        return {"key_func": callable_name(self.key_func), "expiration": _expiration_shown(self.expiration)}


def _expiration_shown(expiration: Expiration) -> Any:
    """The expiry in seconds for the fingerprint: 3600, 3600.0 and timedelta(hours=1) are the same structure (a spec
    writes seconds where the code wrote a timedelta)."""
    if expiration is None:
        return None
    if isinstance(expiration, tuple | list):
        return [seconds_of(v) for v in expiration]
    return seconds_of(expiration)
