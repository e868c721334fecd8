"""Per-run LLM budgets: `Context(budget=Budget(max_cost_usd=..., max_total_tokens=...))`.

A run is its `context.run_id`. Each top-level tree call opens the context's budget before its first node: the
context gets a run id if it has none, and a distributed run (an executor with a Redis URL) writes the caps to
Redis under that id, so every worker of the run counts against one budget (counters under
`tasktree:{flow}:budget:<run id>`, with a TTL of TASKTREE_LLM_BUDGET_TTL_S refreshed on each change). An in-process
run counts in memory. Settings (TASKTREE_LLM_RUN_MAX_COST_USD / _TOTAL_TOKENS) give every run that has a run id
and no Budget of its own the same caps, and fill the caps a Budget leaves None.

Each LLM call reserves its estimate before it is sent and settles its real usage after. Once a cap is reached
no new call starts; a call whose estimate would go over what is left FAILs; a call that might still fit once the
calls in flight settle below their estimates waits for them. A stopped call's result is
FAIL(LLMBudgetExceeded) naming the budget and what was used, so a Gather's result says which items the budget
stopped, and everything finished before is kept.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.serde import register_type
from . import limits
from .limiter import budget_key, get_limiter

#: A budget cap's unit, for messages.
UNITS = {"max_total_tokens": "tokens", "max_cost_usd": "USD"}


@register_type
@dataclass
class LLMBudgetExceeded:
    """The data of an LLM step its run's budget stopped (the step's FAIL result)."""

    budget: str  # "max_total_tokens" or "max_cost_usd"
    limit: float
    used: float
    estimate: float
    reached: bool  # the cap was already reached (else: this call's estimate would have gone over)
    run_id: str = ""
    message: str = ""

    def json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.message


class BudgetExceeded(Exception):
    """Raised by flow control when a run's budget stops a call; the LLM node FAILs with its record."""

    def __init__(self, budget: str, limit: float, used: float, estimate: float, reached: bool, run_id: str) -> None:
        unit = UNITS.get(budget, "")
        if reached:
            message = f"budget exceeded: {budget}={limit:g} reached ({used:g} {unit} used) in run {run_id}; no new " \
                      "LLM call starts"
        else:
            message = f"budget exceeded: this call's estimate of {estimate:g} {unit} would take {budget}={limit:g} " \
                      f"over ({used:g} {unit} used) in run {run_id}"
        super().__init__(message)
        self.record = LLMBudgetExceeded(budget, limit, used, estimate, reached, run_id, message)


def verdict(
    caps: tuple[float | None, float | None], used: tuple[float, float], reserved: tuple[float, float],
    estimate: tuple[float, float],
) -> tuple[str, float, float, float, bool] | str | None:
    """None: the call fits; "wait": it may fit once the calls in flight settle; else (budget, limit, used,
    estimate, reached). Pairs are (tokens, cost) (limiter_script.py applies the same rule in Redis)."""
    names = ("max_total_tokens", "max_cost_usd")
    for cap, spent, est, name in zip(caps, used, estimate, names, strict=True):
        if cap is not None and spent >= cap:
            return name, cap, spent, est, True
    for cap, spent, est, name in zip(caps, used, estimate, names, strict=True):
        if cap is not None and spent + est > cap:
            return name, cap, spent, est, False
    for cap, spent, held, est in zip(caps, used, reserved, estimate, strict=True):
        if cap is not None and spent + held + est > cap:
            return "wait"
    return None


@dataclass
class MemoryLedger:
    """An in-process run's counters: all its calls run in this process, so no Redis is needed."""

    caps: tuple[float | None, float | None]
    used: list[float] = field(default_factory=lambda: [0, 0.0])
    held: dict[str, tuple[float, float]] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)
    _changed: list[asyncio.Future[None]] = field(default_factory=list)

    async def reserve(self, member: str, estimate: tuple[float, float], run_id: str) -> float:
        """Reserve `estimate` (tokens, cost), waiting while calls in flight may still settle below theirs; raises
        BudgetExceeded. Returns the seconds waited."""
        started = time.perf_counter()
        while True:
            self.touched = time.monotonic()
            reserved = tuple(sum(part) for part in zip(*self.held.values(), strict=True)) or (0, 0.0)
            outcome = verdict(self.caps, (self.used[0], self.used[1]), reserved, estimate)  # type: ignore[arg-type]
            if outcome is None:
                self.held[member] = estimate
                return time.perf_counter() - started
            if outcome != "wait":
                raise BudgetExceeded(*outcome, run_id=run_id)  # type: ignore[misc]
            changed = asyncio.get_running_loop().create_future()
            self._changed.append(changed)
            await changed

    def settle(self, member: str, tokens: float, cost: float) -> None:
        """The call is over: its reservation becomes what it really used."""
        if self.held.pop(member, None) is not None:
            self.used[0] += tokens
            self.used[1] += cost
        waiters, self._changed = self._changed, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


_ledgers: dict[str, MemoryLedger] = {}


def memory_ledger(run_id: str, caps: tuple[float | None, float | None]) -> MemoryLedger:
    """The ledger of an in-process run (made on first use; idle ledgers are dropped after the budget TTL)."""
    ledger = _ledgers.get(run_id)
    if ledger is None or ledger.caps != caps:
        ttl = limits.config().budget_ttl_s
        for stale in [key for key, old in _ledgers.items() if time.monotonic() - old.touched > ttl]:
            del _ledgers[stale]
        ledger = _ledgers[run_id] = MemoryLedger(caps)
    return ledger


@dataclass(frozen=True)
class Budget:
    """A run's spending caps; None falls back to the setting (TASKTREE_LLM_RUN_MAX_*), else no cap."""

    max_cost_usd: float | None = None
    max_total_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_cost_usd", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"Budget.{name} must be a positive number, got {value!r}")

    def caps(self, cfg: limits.FlowConfig) -> tuple[float | None, float | None]:
        """(max tokens, max cost) after the settings' fallbacks."""
        tokens = self.max_total_tokens if self.max_total_tokens is not None else cfg.run_max_total_tokens
        cost = self.max_cost_usd if self.max_cost_usd is not None else cfg.run_max_cost_usd
        return tokens, cost

    async def open(self, context: Any) -> None:
        """Called by each top-level tree call before its first node: gives the context a run id and makes the
        budget visible where the run's calls happen (Redis for a distributed run, memory in-process)."""
        cfg = limits.config()
        caps = self.caps(cfg)
        if context.run_id is None:
            context.run_id = uuid.uuid4().hex
        redis_url = getattr(context.executor, "redis_url", None)
        if redis_url is None:
            memory_ledger(context.run_id, caps)
            return
        key = budget_key(context.run_id)
        limit = [-1 if cap is None else cap for cap in caps]
        await get_limiter(redis_url, cfg.lease_s).call(
            lambda index: {"o": "B", "b": [index.budget(key), cfg.budget_ttl_s, *limit]}
        )
