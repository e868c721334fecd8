"""The Prometheus side of core.instruments: each hook takes plain values (no tasktree types: any package may call
them without an import circle) and never raises: a metrics bug must not fail a unit."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from ..core.instruments import Instruments
from ..core.log import logger
from . import definitions as m
from .server import metrics_address, start_metrics_server

_warned = False


def _safely(update: Any) -> None:
    global _warned
    try:
        update()
    except Exception as exc:  # noqa: BLE001 - metrics are best effort; log the first failure only
        if not _warned:
            _warned = True
            logger.warning("metrics update failed: %s: %s", type(exc).__name__, exc)


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, kept: labels() takes a lock and rebuilds its key on every call, and LLM calls
    update several metrics each. Fetched again if the child was removed from the metric (clear(), remove())."""
    key = (metric, values)
    child = _children.get(key)
    if child is None or metric._metrics.get(values) is not child:
        child = _children[key] = metric.labels(*values)
    return child


# -- units --------------------------------------------------------------------------------------------------------
def units_sent(units: list[Any]) -> None:
    """A coordinator published these units (objects with `tree` and `queue`)."""
    def update() -> None:
        for unit in units:
            _child(m.UNITS_SENT, unit.tree, unit.queue).inc()
    _safely(update)


def unit_started(tree: str, queue: str, queued_ms: float | None) -> None:
    def update() -> None:
        _child(m.UNITS_STARTED, tree, queue).inc()
        m.UNITS_RUNNING.inc()
        if queued_ms is not None:
            _child(m.UNIT_QUEUE_WAIT, tree, queue).observe(max(0.0, queued_ms) / 1000)
    _safely(update)


def unit_finished(tree: str, queue: str, ok: bool, run_ms: float | None) -> None:
    def update() -> None:
        status = "OK" if ok else "FAIL"
        _child(m.UNITS_FINISHED, tree, queue, status).inc()
        m.UNITS_RUNNING.dec()
        if run_ms is not None:
            _child(m.UNIT_RUN, tree, queue, status).observe(max(0.0, run_ms) / 1000)
    _safely(update)


_dispatchers: weakref.WeakSet[Any] = weakref.WeakSet()


def _in_flight() -> float:
    return float(sum(len(getattr(d, "inflight", ())) for d in list(_dispatchers)))


def track_dispatcher(dispatcher: Any, settings: Any) -> None:
    """A coordinator loop's dispatcher exists: count its `inflight` units, and serve metrics if configured (an
    application coordinating runs inline is scrapeable like a worker)."""
    def update() -> None:
        _dispatchers.add(dispatcher)
        m.UNITS_IN_FLIGHT.set_function(_in_flight)
        start_metrics_server(settings)
    _safely(update)


def unit_lost(tree: str, holder: str, gave_up: bool) -> None:
    """A unit's holder is gone and it is sent again (or, `gave_up`, FAILed after TASKTREE_MAX_DISPATCHES).
    `holder` is the dead process (its lease expired) or a `(in transit...)` note for a message lost on the way."""
    def update() -> None:
        if "(in transit" not in holder:
            m.LEASE_EXPIRIES.labels(tree).inc()
        if gave_up:
            reason = "gave_up"
        elif "Redis outage" in holder:
            reason = "redis_outage"
        elif "(in transit" in holder:
            reason = "in_transit"
        else:
            reason = "lease_expired"
        m.UNITS_REDISPATCHED.labels(tree, reason).inc()
    _safely(update)


def units_handed_back(tree: str, queue: str, count: int) -> None:
    _safely(lambda: _child(m.UNITS_HANDED_BACK, tree, queue).inc(count))


def units_unrunnable(units: list[Any]) -> None:
    """The coordinator FAILed these units (objects with `tree` and `queue`): no live worker could run them."""
    def update() -> None:
        for unit in units:
            _child(m.UNITS_UNRUNNABLE, unit.tree, unit.queue).inc()
    _safely(update)


# -- runs ---------------------------------------------------------------------------------------------------------
def run_state(state: Any) -> None:
    """This process changed a run's state (created queued/running, claimed, finished, cancelled, retried)."""
    _safely(lambda: m.RUN_TRANSITIONS.labels(str(getattr(state, "value", state))).inc())


def run_finished(tree: str, state: Any, seconds: float | None, cost: float, tokens: int) -> None:
    """The coordinator recorded a run's end (`state`: succeeded, failed or cancelled)."""
    def update() -> None:
        name = str(getattr(state, "value", state))
        _child(m.RUNS_FINISHED, tree, name).inc()
        if seconds is not None:
            _child(m.RUN_DURATION, tree, name).observe(max(0.0, seconds))
        if cost:
            _child(m.RUN_COST, tree).inc(cost)
        if tokens:
            _child(m.RUN_TOKENS, tree).inc(tokens)
    _safely(update)


# -- LLM ----------------------------------------------------------------------------------------------------------
def llm_call(
    model: str,
    seconds: float,
    tokens: Mapping[str, int] | None = None,
    cost: float | None = None,
    error: BaseException | None = None,
) -> None:
    """One LLM call ended: OK with its tokens and cost, or failed with `error` (a 429 counts as rate_limited)."""
    def update() -> None:
        status = "ok"
        if error is not None:
            status = "rate_limited" if getattr(error, "status_code", None) == 429 else "error"
        _child(m.LLM_CALLS, model, status).inc()
        _child(m.LLM_LATENCY, model).observe(max(0.0, seconds))
        if tokens:
            for kind in ("prompt", "completion"):
                if tokens.get(kind):
                    _child(m.LLM_TOKENS, model, kind).inc(tokens[kind])
        if cost:
            _child(m.LLM_COST, model).inc(cost)
    _safely(update)


def record_limiter_wait(model: str, seconds: float) -> None:
    """For the LLM flow control: a call waited `seconds` for its rate limiter (0 when it went at once)."""
    _safely(lambda: m.LLM_LIMITER_WAIT.labels(model).observe(max(0.0, seconds)))


def record_rate_limited(model: str) -> None:
    """For the LLM flow control: the provider answered 429 (count every one, also those retried)."""
    _safely(lambda: m.LLM_RATE_LIMITED.labels(model).inc())


# -- trouble ------------------------------------------------------------------------------------------------------
def redis_error() -> None:
    _safely(m.REDIS_ERRORS.inc)


def broker_error() -> None:
    _safely(m.BROKER_ERRORS.inc)


class PrometheusInstruments(Instruments):
    """The events of core.instruments counted in Prometheus metrics (installed by `import tasktree_dist.metrics`)."""

    units_sent = staticmethod(units_sent)
    unit_started = staticmethod(unit_started)
    unit_finished = staticmethod(unit_finished)
    track_dispatcher = staticmethod(track_dispatcher)
    unit_lost = staticmethod(unit_lost)
    units_handed_back = staticmethod(units_handed_back)
    units_unrunnable = staticmethod(units_unrunnable)
    run_state = staticmethod(run_state)
    run_finished = staticmethod(run_finished)
    llm_call = staticmethod(llm_call)
    record_limiter_wait = staticmethod(record_limiter_wait)
    record_rate_limited = staticmethod(record_rate_limited)
    redis_error = staticmethod(redis_error)
    broker_error = staticmethod(broker_error)

    def serve(self, settings: Any) -> None:
        start_metrics_server(settings)

    def address(self) -> str | None:
        return metrics_address()
