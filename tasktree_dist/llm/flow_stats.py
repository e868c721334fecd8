"""Process-wide flow-control figures, for a metrics module to publish (`flow_stats().snapshot()`).

Plain counters updated on the event loop (no lock: one writer per loop; a reader sees a consistent-enough
snapshot), reset with `reset()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class FlowStats:
    calls: int = 0  # governed LLM calls
    admissions: int = 0  # attempts let through (a retried call counts once per attempt)
    polls: int = 0  # admission requests sent to Redis (one per attempt, more when it waits)
    reserved_tokens: int = 0  # estimates reserved before sending
    waits: int = 0  # attempts that waited for a limit, a pause or the budget
    wait_seconds: float = 0.0
    waits_by_reason: dict[str, int] = field(default_factory=dict)  # rpm, tpm, concurrency, pause, budget
    rate_limited: int = 0  # 429 answers
    pauses: int = 0  # fleet-wide pauses this process set (429, or 503 with Retry-After)
    retries: int = 0
    refunds: int = 0  # corrections down: real usage below the estimate
    refunded_tokens: int = 0
    charges: int = 0  # corrections up: real usage above the estimate
    charged_tokens: int = 0
    budget_exceeded: int = 0  # calls a run's budget stopped

    def waited(self, reason: str, seconds: float) -> None:
        self.waits += 1
        self.wait_seconds += seconds
        self.waits_by_reason[reason] = self.waits_by_reason.get(reason, 0) + 1

    def corrected(self, delta: int) -> None:
        if delta < 0:
            self.refunds += 1
            self.refunded_tokens -= delta
        elif delta > 0:
            self.charges += 1
            self.charged_tokens += delta

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        data["wait_seconds"] = round(self.wait_seconds, 6)
        return data

    def reset(self) -> None:
        for item in fields(self):
            setattr(self, item.name, item.default_factory() if callable(item.default_factory) else item.default)


_stats = FlowStats()


def flow_stats() -> FlowStats:
    """This process's flow-control counters."""
    return _stats
