"""What hot paths report (units, runs, LLM calls, Redis and broker trouble), as a protocol with no-op defaults.

The layers below the metrics package (nodes, llm, distributed, runs) call `hooks.<event>(...)` with plain values;
`tasktree_dist.metrics` installs its Prometheus implementation into the same `hooks` object when it is imported
(`import tasktree_dist` does), so the lower layers never import the metrics package and a process without it
pays one no-op call per event. Implementations never raise: a metrics bug must not fail a unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Instruments:
    """The events a process reports; every method a no-op here. An implementation overrides what it counts."""

    def units_sent(self, units: list[Any]) -> None:
        """A coordinator published these units (objects with `tree` and `queue`)."""

    def unit_started(self, tree: str, queue: str, queued_ms: float | None) -> None:
        """A worker started a unit after `queued_ms` in the broker."""

    def unit_finished(self, tree: str, queue: str, ok: bool, run_ms: float | None) -> None:
        """A worker finished a unit."""

    def track_dispatcher(self, dispatcher: Any, settings: Any) -> None:
        """A coordinator loop's dispatcher exists (its `inflight` units can be counted)."""

    def unit_lost(self, tree: str, holder: str, gave_up: bool) -> None:
        """A unit's holder is gone: it is sent again, or FAILed when `gave_up`."""

    def units_handed_back(self, tree: str, queue: str, count: int) -> None:
        """A worker without their tree handed units back to their queue."""

    def units_unrunnable(self, units: list[Any]) -> None:
        """A coordinator FAILed these units (objects with `tree` and `queue`): no live worker could run them."""

    def run_state(self, state: Any) -> None:
        """This process changed a run's state."""

    def run_finished(self, tree: str, state: Any, seconds: float | None, cost: float, tokens: int) -> None:
        """This process (the run's coordinator) recorded the end of a run of `tree`."""

    def llm_call(self, model: str, seconds: float, tokens: Mapping[str, int] | None = None,
                 cost: float | None = None, error: BaseException | None = None) -> None:
        """One LLM call ended (OK with tokens and cost, or failed with `error`)."""

    def record_limiter_wait(self, model: str, seconds: float) -> None:
        """An LLM call waited `seconds` for flow control."""

    def record_rate_limited(self, model: str) -> None:
        """The provider answered 429."""

    def redis_error(self) -> None:
        """A Redis command failed (and is retried)."""

    def broker_error(self) -> None:
        """A send to the broker failed (and is retried)."""

    def serve(self, settings: Any) -> None:
        """Serve this process's metrics when the settings say where (TASKTREE_METRICS_PORT)."""

    def address(self) -> str | None:
        """`host:port` others can scrape this process at, or None."""
        return None


#: The one instance every layer calls; `install` rebinds its methods in place, so a module that imported it
#: earlier calls the installed implementation (no import-time copy goes stale).
hooks = Instruments()


def install(implementation: Instruments) -> None:
    """Route every event of this process to `implementation` (the metrics package calls this at import)."""
    for name in dir(Instruments):
        if not name.startswith("_"):
            setattr(hooks, name, getattr(implementation, name))
