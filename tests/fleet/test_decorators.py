"""Decorator nodes: ForceOk/ForceFail, Return, Invert, Retry, While, Timeout, Cacher, Terminable, Wrapper."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

import tasktree_dist
from tasktree_dist import Context, InMemoryCacheStore, Node, Result, Status, TraceNode, Tree
from tasktree_dist.nodes import decorators
from tests.helpers import make_run, node, step


@dataclass
class BB:
    value: int = 0
    count: int = 0
    flag: bool = True
    key: str = "cache:key"
    version: int = 1
    use_cache: bool = True
    events: list[Any] = field(default_factory=list)


run = make_run(BB)


# -- ForceOk / ForceFail / Return / Invert --------------------------------------------------------------------


async def test_force_ok_keeps_child_data() -> None:
    result, context = await run(Tree("DecForceOk").ForceOk()._().Function(lambda: Result.FAIL("data")).End())
    assert result == Result.OK("data")
    assert list(node(context)["children"]) == ["ForceOk(None)"]
    assert (await run(Tree().ForceOk()._().Failure().End()))[0] == Result.OK(None)
    assert (await run(Tree().ForceOk()._().Function(lambda: "x").End()))[0] == Result.OK("x")


async def test_force_ok_with_result_factory() -> None:
    def skipped(b: BB) -> dict[str, Any]:
        return {"skipped": True, "v": b.value}

    result, context = await run(Tree("DecForceOkF").ForceOk(skipped)._().Failure().End(), BB(value=3))
    assert result == Result.OK({"skipped": True, "v": 3})
    assert list(node(context)["children"]) == ["ForceOk(skipped)"]


async def test_force_fail_with_and_without_factory() -> None:
    assert (await run(Tree().ForceFail()._().Function(lambda: "x").End()))[0] == Result.FAIL("x")
    assert (await run(Tree().ForceFail(lambda b: b.value)._().Function(lambda: "x").End(), BB(value=4)))[0] == (
        Result.FAIL(4)
    )
    assert (await run(Tree().ForceFail(lambda: "no-arg")._().Failure().End()))[0] == Result.FAIL("no-arg")


async def test_return_keeps_status_and_replaces_data() -> None:
    assert (await run(Tree().Return(lambda b: "data")._().Function(lambda: "x").End()))[0] == Result.OK("data")
    assert (await run(Tree().Return(lambda b: b.value)._().Failure().End(), BB(value=8)))[0] == Result.FAIL(8)


async def test_invert() -> None:
    assert (await run(Tree().Invert()._().Function(lambda: "d").End()))[0] == Result.FAIL("d")
    assert (await run(Tree().Invert()._().Function(lambda: Result.FAIL("e")).End()))[0] == Result.OK("e")
    assert (await run(Tree().Invert()._().Invert()._()._().Failure().End()))[0] == Result.FAIL(None)


# -- Retry ----------------------------------------------------------------------------------------------------


class _AsyncioProxy:
    """Stands in for the `asyncio` module inside tasktree_dist.nodes.decorators, recording sleeps."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.sleeps.append(delay)
        await asyncio.sleep(0)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    proxy = _AsyncioProxy()
    monkeypatch.setattr(decorators, "asyncio", proxy)
    return proxy.sleeps


def flaky(succeed_on: int) -> Callable[[BB], Result]:
    def attempt(b: BB) -> Result:
        b.count += 1
        return Result.OK(f"ok on {b.count}") if b.count >= succeed_on else Result.FAIL(f"fail {b.count}")

    return attempt


async def test_retry_succeeds_on_third_try(sleeps: list[float]) -> None:
    bb = BB()
    result, context = await run(Tree("DecRetry").Retry(5, sleep_secs=0.5)._().Function(flaky(3)).End(), bb)
    assert result == Result.OK("ok on 3")
    assert bb.count == 3
    assert sleeps == [0.5, 0.5]
    logs = node(context, "Retry")["logs"]
    assert any(line.endswith("sleep => 0.5") for line in logs)
    assert any(line.endswith("result ok, tries => 3") for line in logs)
    # each try has its own trace node
    tries = ["Function(attempt)", "Function(attempt)#2", "Function(attempt)#3"]
    assert list(node(context, "Retry")["children"]) == tries


async def test_retry_gives_up_with_fail_none_and_no_sleep_after_last_try(sleeps: list[float]) -> None:
    bb = BB()
    result, _ = await run(Tree().Retry(4, sleep_secs=[0.1, 0.2, 0.3, 0.4])._().Function(flaky(99)).End(), bb)
    assert result == Result.FAIL(None)
    assert bb.count == 4
    assert sleeps == [0.1, 0.2, 0.3]


async def test_retry_int_sleep_secs_counts(sleeps: list[float]) -> None:
    bb = BB()
    assert (await run(Tree().Retry(3, sleep_secs=2)._().Function(flaky(99)).End(), bb))[0] == Result.FAIL(None)
    assert sleeps == [2, 2]
    assert bb.count == 3


async def test_retry_list_shorter_than_tries_stops_sleeping(sleeps: list[float]) -> None:
    bb = BB()
    assert (await run(Tree().Retry(4, sleep_secs=[0.25])._().Function(flaky(99)).End(), bb))[0].is_fail()
    assert sleeps == [0.25]
    assert bb.count == 4


async def test_retry_without_sleep_never_sleeps(sleeps: list[float]) -> None:
    bb = BB()
    assert (await run(Tree().Retry(3)._().Function(flaky(2)).End(), bb))[0] == Result.OK("ok on 2")
    assert sleeps == []


async def test_retry_first_try_ok_runs_once(sleeps: list[float]) -> None:
    bb = BB()
    assert (await run(Tree().Retry(3, sleep_secs=1.0)._().Function(flaky(1)).End(), bb))[0] == Result.OK("ok on 1")
    assert bb.count == 1
    assert sleeps == []


async def test_retry_real_short_sleep_works() -> None:
    bb = BB()
    assert (await run(Tree().Retry(2, sleep_secs=0.001)._().Function(flaky(2)).End(), bb))[0] == Result.OK("ok on 2")


# -- While ----------------------------------------------------------------------------------------------------


async def test_while_checks_condition_before_each_round() -> None:
    def cond(b: BB) -> bool:
        b.events.append("cond")
        return b.count < 3

    def body(b: BB) -> int:
        b.events.append("body")
        b.count += 1
        return b.count

    bb = BB()
    result, context = await run(Tree("DecWhile").While(cond)._().Function(body).End(), bb)
    assert result == Result.OK(3)
    assert bb.events == ["cond", "body", "cond", "body", "cond", "body", "cond"]
    assert list(node(context)["children"]) == ["While(cond)"]


async def test_while_false_at_start_is_fail_none() -> None:
    bb = BB(flag=False)
    assert (await run(Tree().While("flag")._().Function(step("body")).End(), bb))[0] == Result.FAIL(None)
    assert bb.events == []


async def test_while_max_loop_times_caps_rounds() -> None:
    bb = BB()

    def body(b: BB) -> int:
        b.count += 1
        return b.count

    result, context = await run(Tree("DecWhileMax").While(lambda: True, max_loop_times=5)._().Function(body).End(), bb)
    assert result == Result.OK(5)
    assert bb.count == 5
    assert any("exceed max_loop_times" in line for line in node(context, "While(lambda)")["logs"])


async def test_while_failing_child_returns_last_ok() -> None:
    def body(b: BB) -> Result:
        b.count += 1
        return Result.OK(b.count) if b.count < 3 else Result.FAIL("stop")

    bb = BB()
    assert (await run(Tree().While("flag")._().Function(body).End(), bb))[0] == Result.OK(2)
    assert bb.count == 3
    assert (await run(Tree().While("flag")._().Failure().End(), bb))[0] == Result.FAIL(None)


async def test_while_async_condition_and_tracer_form() -> None:
    async def cond(b: BB, tracer: TraceNode) -> bool:
        assert tracer.kind == "While"
        return b.count < 2

    def body(b: BB) -> int:
        b.count += 1
        return b.count

    bb = BB()
    assert (await run(Tree().While(cond)._().Function(body).End(), bb))[0] == Result.OK(2)


# -- Timeout --------------------------------------------------------------------------------------------------


async def never_finishes(b: BB) -> str:
    b.events.append("started")
    await asyncio.Event().wait()
    return "unreachable"


async def test_timeout_expiry_without_fallback_is_fail_none() -> None:
    bb = BB()
    result, context = await run(Tree("DecTimeout").Timeout(0.05)._().Function(never_finishes).End(), bb)
    assert result == Result.FAIL(None)
    assert bb.events == ["started"]
    child = node(context, "Timeout", "Function(never_finishes)")
    assert child["result"]["status"] == "FAIL"
    assert any("cancelled" in line for line in child["logs"])


async def test_timeout_plain_second_child_is_the_fallback() -> None:
    bb = BB()
    tree = Tree().Timeout(0.05)._().Function(never_finishes)._().Function(step("fallback", Result.OK("fb"))).End()
    assert (await run(tree, bb))[0] == Result.OK("fb")
    assert bb.events == ["started", "fallback"]


async def test_timeout_fallback_branch() -> None:
    bb = BB()
    tree = (
        Tree("DecTimeoutFb")
        .Timeout(0.05)
        ._().Function(never_finishes)
        ._().Fallback()
        ._()._().Function(step("fallback", Result.OK("fb")))
        .End()
    )
    result, context = await run(tree, bb)
    assert result == Result.OK("fb")
    assert list(node(context, "Timeout")["children"]) == ["Function(never_finishes)", "Fallback"]
    assert node(context, "Timeout", "Fallback", "Function(fallback)")["result"]["data"] == "fb"


async def test_timeout_fallback_runs_when_main_child_is_a_sequence() -> None:
    # tinytasktree returns FAIL(None) here without running the fallback; we fix that on purpose.
    bb = BB()
    tree = (
        Tree()
        .Timeout(0.05)
        ._().Sequence()
        ._()._().Function(step("first"))
        ._()._().Function(never_finishes)
        ._()._().Function(step("never"))
        ._().Fallback()
        ._()._().Function(step("fallback", Result.OK("fb")))
        .End()
    )
    assert (await run(tree, bb))[0] == Result.OK("fb")
    assert bb.events == ["first", "started", "fallback"]


async def test_timeout_fast_child_passes_through() -> None:
    bb = BB()
    tree = Tree().Timeout(5)._().Function(lambda: "fast")._().Function(step("fallback")).End()
    assert (await run(tree, bb))[0] == Result.OK("fast")
    tree = Tree().Timeout(5)._().Function(lambda: Result.FAIL("slow?"))._().Function(step("fallback")).End()
    assert (await run(tree, bb))[0] == Result.FAIL("slow?")
    assert bb.events == []


async def test_timeout_does_not_swallow_outer_cancellation() -> None:
    started = asyncio.Event()

    async def wait(b: BB) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(run(Tree().Timeout(30)._().Function(wait).End()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- Cacher ---------------------------------------------------------------------------------------------------


def counted(bb_attr: str = "count", value: Any = None) -> Callable[[BB], Any]:
    def expensive(b: BB) -> Any:
        b.count += 1
        return {"n": b.count} if value is None else value

    return expensive


async def test_cacher_in_memory_miss_then_hit() -> None:
    store = InMemoryCacheStore()
    tree = Tree("DecCacheMem").Cacher(lambda b: b.key, store=store)._().Function(counted()).End()
    bb = BB(key="user:7")
    first, context1 = await run(tree, bb)
    second, context2 = await run(tree, bb)
    assert first == Result.OK({"n": 1}) and second == Result.OK({"n": 1})
    assert bb.count == 1
    assert list(store._data) == ["user:7"]  # the key, verbatim
    attrs1, attrs2 = node(context1, "Cacher")["attributes"], node(context2, "Cacher")["attributes"]
    assert attrs1["cache_status"] == "miss" and attrs1["cache_hit"] is False and attrs1["cache_written"] is True
    assert attrs2["cache_status"] == "hit" and attrs2["cache_hit"] is True
    assert node(context2, "Cacher")["children"] == {}  # the child did not run


async def test_cacher_redis_miss_then_hit_and_json_payload(redis_client: Any) -> None:
    tree = Tree("DecCacheRedis").Cacher(lambda b: b.key, store=redis_client)._().Function(counted()).End()
    bb = BB(key="user:42")
    assert (await run(tree, bb))[0] == Result.OK({"n": 1})
    assert (await run(tree, bb))[0] == Result.OK({"n": 1})
    assert bb.count == 1
    assert await redis_client.keys("*") == [b"user:42"]
    raw = await redis_client.get("user:42")
    assert json.loads(raw) == {"value": {"n": 1}, "validation": ""}  # JSON, never pickle
    assert not raw.startswith(b"\x80")


@pytest.mark.parametrize(
    ("expiration", "low", "high"),
    [
        (60, 55, 60),
        (dt.timedelta(minutes=5), 295, 300),
        ((100, 200), 95, 200),
        ((dt.timedelta(seconds=30), 40), 25, 40),
    ],
    ids=["int", "timedelta", "range", "timedelta-range"],
)
async def test_cacher_redis_expiration(redis_client: Any, expiration: Any, low: int, high: int) -> None:
    tree = Tree().Cacher(lambda b: "exp:key", store=redis_client, expiration=expiration)._().Function(counted()).End()
    await run(tree)
    ttl = await redis_client.ttl("exp:key")
    assert low <= ttl <= high


async def test_cacher_default_expiration_is_one_hour(redis_client: Any) -> None:
    await run(Tree().Cacher(lambda b: "exp:default", store=redis_client)._().Function(counted()).End())
    assert 3595 <= await redis_client.ttl("exp:default") <= 3600


async def test_cacher_range_expiration_spreads_ttls(redis_client: Any) -> None:
    ttls = set()
    tree = Tree().Cacher(lambda b: b.key, store=redis_client, expiration=(100, 10000))._().Function(counted()).End()
    for i in range(20):
        await run(tree, BB(key=f"spread:{i}"))
        ttls.add(await redis_client.ttl(f"spread:{i}"))
    assert len(ttls) > 1
    assert all(95 <= t <= 10000 for t in ttls)


async def test_cacher_value_validator_invalidates(redis_client: Any) -> None:
    tree = (
        Tree("DecCacheValid")
        .Cacher(lambda b: b.key, store=redis_client, value_validator=lambda b: b.version)
        ._().Function(counted())
        .End()
    )
    bb = BB(key="valid:1", version=1)
    assert (await run(tree, bb))[0] == Result.OK({"n": 1})
    assert (await run(tree, bb))[0] == Result.OK({"n": 1})
    assert bb.count == 1
    bb.version = 2
    result, context = await run(tree, bb)
    assert result == Result.OK({"n": 2})
    assert bb.count == 2
    assert node(context, "Cacher")["attributes"]["cache_status"] == "invalidated"
    assert json.loads(await redis_client.get("valid:1")) == {"value": {"n": 2}, "validation": "2"}
    assert (await run(tree, bb))[0] == Result.OK({"n": 2})
    assert bb.count == 2


async def test_cacher_value_validator_with_tracer(redis_client: Any) -> None:
    tracers: list[TraceNode] = []

    def validator(b: BB, tracer: TraceNode) -> str:
        tracers.append(tracer)
        return f"v{b.version}"

    tree = Tree().Cacher(lambda b: "valid:2", store=redis_client, value_validator=validator)._().Function(counted())
    tree.End()
    bb = BB()
    await run(tree, bb)
    await run(tree, bb)
    assert bb.count == 1
    bb.version = 5
    await run(tree, bb)
    assert bb.count == 2
    assert [t.kind for t in tracers] == ["Cacher"] * 3
    assert json.loads(await redis_client.get("valid:2"))["validation"] == "v5"


async def test_cacher_disabled(redis_client: Any) -> None:
    tree = Tree("DecCacheOff").Cacher(lambda b: "off:1", store=redis_client, enabled=False)._().Function(counted())
    tree.End()
    bb = BB()
    await run(tree, bb)
    result, context = await run(tree, bb)
    assert result == Result.OK({"n": 2})
    assert bb.count == 2
    assert await redis_client.exists("off:1") == 0
    assert node(context, "Cacher")["attributes"]["cache_status"] == "disabled"


async def test_cacher_enabled_factory(redis_client: Any) -> None:
    tree = Tree().Cacher(lambda b: "fac:1", store=redis_client, enabled=lambda b: b.use_cache)._().Function(counted())
    tree.End()
    bb = BB(use_cache=False)
    await run(tree, bb)
    assert await redis_client.exists("fac:1") == 0
    bb.use_cache = True
    await run(tree, bb)
    await run(tree, bb)
    assert bb.count == 2
    assert await redis_client.exists("fac:1") == 1
    bb.use_cache = False
    await run(tree, bb)  # disabled: neither read nor written
    assert bb.count == 3
    assert json.loads(await redis_client.get("fac:1"))["value"] == {"n": 2}


async def test_cacher_fail_is_not_cached(redis_client: Any) -> None:
    def failing(b: BB) -> Result:
        b.count += 1
        return Result.FAIL("nope")

    tree = Tree().Cacher(lambda b: "fail:1", store=redis_client)._().Function(failing).End()
    bb = BB()
    assert (await run(tree, bb))[0] == Result.FAIL("nope")
    assert (await run(tree, bb))[0] == Result.FAIL("nope")
    assert bb.count == 2
    assert await redis_client.exists("fail:1") == 0


@tasktree_dist.register_type
@dataclass
class Point:
    x: int
    y: int
    tags: tuple[str, ...] = ()


async def test_cacher_registered_dataclass_round_trips_typed(redis_client: Any) -> None:
    def make(b: BB) -> Point:
        b.count += 1
        return Point(1, 2, ("a", "b"))

    tree = Tree().Cacher(lambda b: "typed:1", store=redis_client)._().Function(make).End()
    bb = BB()
    first, _ = await run(tree, bb)
    second, _ = await run(tree, bb)
    assert bb.count == 1
    assert isinstance(second.data, Point)
    assert second.data == first.data == Point(1, 2, ("a", "b"))
    raw = json.loads(await redis_client.get("typed:1"))
    assert raw["value"]["fields"]["x"] == 1  # plain JSON with a type tag


async def test_cacher_corrupt_entry_is_a_miss(redis_client: Any) -> None:
    import pickle

    await redis_client.set("corrupt:1", pickle.dumps({"value": "evil", "validation": ""}))
    tree = Tree("DecCacheCorrupt").Cacher(lambda b: "corrupt:1", store=redis_client)._().Function(counted()).End()
    bb = BB()
    result, context = await run(tree, bb)
    assert result == Result.OK({"n": 1})
    assert bb.count == 1
    assert node(context, "Cacher")["attributes"]["cache_status"] == "decode_error"
    assert json.loads(await redis_client.get("corrupt:1"))["value"] == {"n": 1}


def cacher_trace(context: Context) -> tuple[dict[str, Any], list[str]]:
    traced = node(context, "Cacher")
    return traced["attributes"], [line.split("] : ", 1)[1] for line in traced["logs"]]


async def test_cacher_trace_logs_and_attributes_as_tinytasktree() -> None:
    store = InMemoryCacheStore()
    tree = (
        Tree("DecCacheTrace")
        .Cacher(lambda b: b.key, store=store, expiration=30, value_validator=lambda b: f"v{b.version}",
                enabled=lambda b: b.use_cache)
        ._().Function(counted())
        .End()
    )
    bb = BB(key="trace:1", version=1)
    attrs, logs = cacher_trace((await run(tree, bb))[1])
    assert attrs["cache_validation"] == "v1" and attrs["cache_status"] == "miss"
    assert logs == ["cache miss, key: trace:1", "cache set (on ok), ex: 30s, validation: v1"]
    assert attrs["cache_written"] is True and attrs["cache_expires_in_secs"] == 30

    attrs, logs = cacher_trace((await run(tree, bb))[1])
    assert attrs["cache_status"] == "hit" and logs == ["cache hit, key: trace:1, validation: v1"]

    bb.version = 2
    attrs, logs = cacher_trace((await run(tree, bb))[1])
    assert attrs["cache_status"] == "invalidated" and attrs["cache_validation"] == "v2"
    assert attrs["cache_validation_stored"] == "v1"
    assert logs[0] == "cache key found, but validation value changed: v1 (expect: v2) => deleting key trace:1"
    assert logs[1].startswith("cache set")

    bb.use_cache = False
    attrs, logs = cacher_trace((await run(tree, bb))[1])
    assert attrs["cache_status"] == "disabled" and logs == ["cache disabled"]


class SecondsOnlyStore(InMemoryCacheStore):
    """A store written for tinytasktree's protocol: `set(key, value, ex)` only, ex in seconds (int or float)."""

    def __init__(self) -> None:
        super().__init__()
        self.expiries: list[Any] = []

    async def set(self, key: str, value: Any, ex: Any = None) -> bool:  # type: ignore[override]
        self.expiries.append(ex)
        return await super().set(key, value, ex=ex)


@pytest.mark.parametrize("kind", ["memory", "seconds-only", "redis", "RedisStore"])
async def test_cacher_expiry_below_a_second_is_honoured(kind: str, redis_url: str, redis_client: Any) -> None:
    stores = {"memory": InMemoryCacheStore, "seconds-only": SecondsOnlyStore, "redis": lambda: redis_client,
              "RedisStore": lambda: tasktree_dist.RedisStore(redis_url)}
    store = stores[kind]()
    tree = Tree().Cacher(lambda b: "sub:1", store=store, expiration=dt.timedelta(milliseconds=300))._()
    tree = tree.Function(counted()).End()
    bb = BB()
    await run(tree, bb)
    await run(tree, bb)
    assert bb.count == 1  # cached
    if kind in ("redis", "RedisStore"):
        assert 0 < await redis_client.pttl("sub:1") <= 300
    if kind == "seconds-only":
        assert store.expiries == [0.3]
    await asyncio.sleep(0.4)
    await run(tree, bb)
    assert bb.count == 2  # expired after 0.3 s, not rounded up to a second
    if kind == "RedisStore":
        await store.aclose()


async def test_stores_take_fractional_seconds_and_milliseconds(redis_url: str, redis_client: Any) -> None:
    redis_store = tasktree_dist.RedisStore(redis_url)
    try:
        await redis_store.set("f:1", "x", ex=1.5)
        await redis_store.set("f:2", "x", ex=dt.timedelta(seconds=2))
        await redis_store.set("f:3", "x", px=250)
        assert 1000 < await redis_client.pttl("f:1") <= 1500
        assert 1000 < await redis_client.pttl("f:2") <= 2000
        assert 0 < await redis_client.pttl("f:3") <= 250
    finally:
        await redis_store.aclose()
    memory = InMemoryCacheStore()
    await memory.set("a", 1, ex=dt.timedelta(milliseconds=100))
    await memory.set("b", 1, px=100)
    await memory.set("c", 1, ex=0.1)
    assert [await memory.get(k) for k in "abc"] == [1, 1, 1]
    await asyncio.sleep(0.15)
    assert [await memory.get(k) for k in "abc"] == [None, None, None]


# -- Terminable -----------------------------------------------------------------------------------------------


class CountingStore:
    """Delegates to a real store; signals once `exists` has been polled `times` times."""

    def __init__(self, store: Any, times: int) -> None:
        self.store = store
        self.exists_calls = 0
        self.times = times
        self.polled = asyncio.Event()

    async def exists(self, *keys: str) -> Any:
        found = await self.store.exists(*keys)
        self.exists_calls += 1
        if self.exists_calls >= self.times:
            self.polled.set()
        return found

    async def delete(self, *keys: str) -> Any:
        return await self.store.delete(*keys)


async def test_terminable_key_set_during_run_cancels_child_and_runs_fallback(redis_client: Any) -> None:
    started = asyncio.Event()

    async def long_job(b: BB) -> str:
        b.events.append("started")
        started.set()
        await asyncio.Event().wait()
        b.events.append("finished")
        return "unreachable"

    tree = (
        Tree("DecTerm")
        .Terminable(lambda b: f"stop:{b.value}", store=redis_client, monitor_interval_ms=10)
        ._().Function(long_job)
        ._().Fallback()
        ._()._().Function(step("fallback", Result.OK("fb")))
        .End()
    )

    async def stopper() -> None:
        await started.wait()
        await redis_client.set("stop:5", "1")

    bb = BB(value=5)
    stop_task = asyncio.ensure_future(stopper())
    result, context = await asyncio.wait_for(run(tree, bb), 5)
    await stop_task
    assert result == Result.OK("fb")
    assert bb.events == ["started", "fallback"]
    assert await redis_client.exists("stop:5") == 0  # the signal was consumed
    main = node(context, "Terminable", "Function(long_job)")
    assert main["result"]["status"] == "FAIL"
    assert any("cancelled" in line for line in main["logs"])
    assert any("cancelled" in line for line in node(context, "Terminable")["logs"])


async def test_terminable_without_fallback_is_fail_none(redis_client: Any) -> None:
    started = asyncio.Event()

    async def long_job(b: BB) -> str:
        started.set()
        await asyncio.Event().wait()
        return "unreachable"

    tree = Tree().Terminable(lambda b: "stop:nofb", store=redis_client, monitor_interval_ms=10)._().Function(long_job)
    tree.End()
    task = asyncio.ensure_future(run(tree))
    await started.wait()
    await redis_client.set("stop:nofb", "1")
    result, _ = await asyncio.wait_for(task, 5)
    assert result == Result.FAIL(None)
    assert await redis_client.exists("stop:nofb") == 0


async def test_terminable_stale_key_is_cleared_and_does_not_terminate(redis_client: Any) -> None:
    await redis_client.set("stop:stale", "1")
    store = CountingStore(redis_client, times=3)

    async def job(b: BB) -> str:
        await store.polled.wait()  # finish only after the monitor has looked for the key several times
        return "done"

    tree = (
        Tree()
        .Terminable(lambda b: "stop:stale", store=store, monitor_interval_ms=5)
        ._().Function(job)
        ._().Function(step("fallback"))
        .End()
    )
    bb = BB()
    result, _ = await asyncio.wait_for(run(tree, bb), 5)
    assert result == Result.OK("done")
    assert bb.events == []
    assert store.exists_calls >= 3
    assert await redis_client.exists("stop:stale") == 0


async def test_terminable_fast_child_returns_its_result(redis_client: Any) -> None:
    bb = BB()
    tree = (
        Tree()
        .Terminable(lambda b: "stop:fast", store=redis_client)
        ._().Function(lambda: Result.FAIL("own result"))
        ._().Function(step("fallback"))
        .End()
    )
    assert (await asyncio.wait_for(run(tree, bb), 5))[0] == Result.FAIL("own result")
    assert bb.events == []


async def test_terminable_with_in_memory_store() -> None:
    store = InMemoryCacheStore()
    started = asyncio.Event()

    async def long_job(b: BB) -> str:
        started.set()
        await asyncio.Event().wait()
        return "x"

    tree = Tree().Terminable(lambda b: "stop:mem", store=store, monitor_interval_ms=5)._().Function(long_job)
    tree._().Function(lambda: "fallback").End()
    task = asyncio.ensure_future(run(tree))
    await started.wait()
    await store.set("stop:mem", "1")
    assert (await asyncio.wait_for(task, 5))[0] == Result.OK("fallback")
    assert await store.exists("stop:mem") == 0


# -- Wrapper --------------------------------------------------------------------------------------------------


async def test_wrapper_runs_child_inside_async_context_manager() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def traced(child: Node, context: Context) -> AsyncIterator[Result]:
        events.append("before")
        try:
            result = await child(context)
            events.append(f"child:{result.data}")
            yield Result(result.status, ("wrapped", result.data))
        finally:
            events.append("after")

    result, context = await run(Tree("DecWrap").Wrapper(traced)._().Function(lambda: "inner").End())
    assert result == Result.OK(("wrapped", "inner"))
    assert events == ["before", "child:inner", "after"]
    assert node(context, "Wrapper", "Function(lambda)")["result"] == {"status": "OK", "data": "inner"}


async def test_wrapper_yielding_non_result_fails() -> None:
    @asynccontextmanager
    async def bad(child: Node, context: Context) -> AsyncIterator[Any]:
        yield (await child(context)).data

    result, context = await run(Tree("DecWrapBad").Wrapper(bad)._().Function(lambda: "inner").End())
    assert result == Result.FAIL(None)
    assert "not a Result" in node(context, "Wrapper")["attributes"]["error"]


async def test_wrapper_not_a_context_manager_fails() -> None:
    result, context = await run(Tree("DecWrapNotCm").Wrapper(lambda child, ctx: "nope")._().TODO().End())
    assert result.status is Status.FAIL
    assert "async context manager" in node(context, "Wrapper")["attributes"]["error"]
