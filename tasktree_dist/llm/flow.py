"""Flow control of one LLM call: the gate the LLM node sends a governed call through.

`gate()` returns None for a call no limit or budget governs (no Redis, next to no CPU), else a `Gate` that:
- reserves the call's estimate in every scope's window, a concurrency slot, and the run's budget, in one atomic
  script call, waiting (asyncio sleeps, as long as the script says) in the model's fair waiting room when they
  are full (limiter.py, limiter_script.py);
- sends one attempt at a time (the direct transport's `send_once`, or a max_retries=0 copy of the openai client)
  and retries as openai-python would (408/409/429/5xx, x-should-retry, retry-after[-ms], jittered exponential
  back-off capped at 8 s), each attempt waiting for the limits again;
- turns a 429, or a 503 with Retry-After, into a pause of the model's calls on the whole fleet;
- corrects the reservation with the real usage (a refund, or a charge), frees the slot, settles the budget.
Every attempt goes to the trace (`llm_attempts`: status, wait, what it waited for, retry-after), with the scopes,
the estimate, the total wait and the correction; a failed call's trace keeps the request it sent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
import uuid
import weakref
from collections import OrderedDict
from typing import Any

import openai

from ..core.instruments import hooks as metrics
from ..core.log import logger
from ..core.result import Result, Status
from ..core.trace import TraceNode
from . import limits
from .budget import Budget, BudgetExceeded, MemoryLedger, memory_ledger
from .direct import DirectCall, retry_delay, server_delay, should_retry
from .flow_stats import flow_stats
from .limiter import Cooling, FlowError, KeyIndex, Lease, Limiter, budget_key, get_limiter
from .types import token_cost

#: Capacity may come back before the script's estimate: the calls ahead may use fewer tokens than they reserved
#: (refunds), release their slots early, settle their budget reservations. So a wait for tokens is slept in halves
#: (a few looks per call, not one every few ms), a wait for a slot or a budget at most this long (a call of this
#: process that finishes wakes its first waiters at once; waits for a window to pass and for a pause are exact).
MAX_POLL_S = {"concurrency": 0.25, "budget": 0.1}
HALVED = {"tpm"}
MIN_POLL_S = 0.25
#: How long a waiter's place in the waiting room outlives the wait it was told (its process may be busy).
TICKET_GRACE_MS = 5000
#: Runs this process found without a budget in Redis (their calls skip the lookup).
NO_BUDGET_RUNS = 10_000
_runs_without_budget: OrderedDict[str, None] = OrderedDict()
_single_attempt: weakref.WeakKeyDictionary[openai.AsyncOpenAI, openai.AsyncOpenAI] = weakref.WeakKeyDictionary()
_base_urls: weakref.WeakKeyDictionary[openai.AsyncOpenAI, str] = weakref.WeakKeyDictionary()
#: Call ids unique across the fleet: a random token per import, the process id (a fork shares the token), a count.
_TOKEN = uuid.uuid4().hex[:12]
_calls = itertools.count()


class RedisBudget:
    """A run's budget counted in Redis: `create` puts the settings' caps there when the run has none yet;
    otherwise a run without a record has no budget (`lookup`: nothing says it has one)."""

    __slots__ = ("key", "create", "lookup")

    def __init__(self, run_id: str, create: tuple[float | None, float | None] | None, lookup: bool) -> None:
        self.key, self.create, self.lookup = budget_key(run_id), create, lookup

    def op(self, index: KeyIndex, estimate: tuple[int, float], ttl_s: int) -> list[Any]:
        caps = [-1 if cap is None else cap for cap in (self.create or (None, None))]
        return [index.budget(self.key), estimate[0], estimate[1], ttl_s, int(self.create is not None), *caps]


def _budget(context: Any, cfg: limits.FlowConfig, distributed: bool) -> MemoryLedger | RedisBudget | None:
    """Where this call's run counts its spending, if anywhere: memory for an in-process run with a Budget, Redis
    for a distributed one, for a run with a run id when the settings give every run a budget, and for a run whose
    budget is unknown here (a worker learns it from Redis, once per run)."""
    run_id = context.run_id
    budget = getattr(context, "budget", None)
    if isinstance(budget, Budget):
        caps = budget.caps(cfg)
        if not distributed:
            return memory_ledger(run_id or f"context-{id(context)}", caps)
        return RedisBudget(run_id, caps, lookup=False)
    if run_id is None:
        return None
    if cfg.run_budget:
        return RedisBudget(run_id, (cfg.run_max_total_tokens, cfg.run_max_cost_usd), lookup=False)
    if run_id in _runs_without_budget:
        return None
    return RedisBudget(run_id, None, lookup=True)


def _no_budget(run_id: str) -> None:
    _runs_without_budget[run_id] = None
    while len(_runs_without_budget) > NO_BUDGET_RUNS:
        _runs_without_budget.popitem(last=False)


def _base_url(client: openai.AsyncOpenAI) -> str:
    """The client's base URL as a string (worked out once per client: openai builds it on each access)."""
    url = _base_urls.get(client)
    if url is None:
        url = _base_urls[client] = str(client.base_url)
    return url


def _single_attempt_client(client: openai.AsyncOpenAI) -> openai.AsyncOpenAI:
    """A copy of `client` that never retries (the gate does), sharing its HTTP connections."""
    copy = _single_attempt.get(client)
    if copy is None:
        copy = _single_attempt[client] = client.with_options(max_retries=0)
    return copy


def _pace(reason: str, wait_s: float) -> float:
    """How long to sleep before asking again, for a wait of `wait_s` the script computed for `reason`."""
    if reason == "pause":
        return _jittered(wait_s)
    if reason in HALVED:
        wait_s = min(wait_s, max(MIN_POLL_S, wait_s / 2))
    return max(min(wait_s, MAX_POLL_S.get(reason, wait_s)), 0.001)


def _jittered(seconds: float) -> float:
    """A little later than asked, at random: the fleet's waiters do not all come back at once."""
    return seconds + random.uniform(0, min(1.0, 0.1 * seconds))


def gate(
    context: Any, tracer: TraceNode, client: openai.AsyncOpenAI, model_name: str, spec: Any,
    request: dict[str, Any], direct: DirectCall | None, attempts: list[dict[str, Any]] | None = None,
) -> Gate | None:
    """The gate for this call, or None when nothing governs it."""
    cfg = limits.config()
    may_govern = limits.may_govern(spec, cfg)
    plan = limits.plan(model_name, spec, _base_url(client), context.blackboard, cfg) if may_govern else None
    redis_url = getattr(context.executor, "redis_url", None)  # a distributed run's coordinator: the fleet's Redis
    budget = _budget(context, cfg, distributed=redis_url is not None)
    if plan is None and budget is None:
        return None
    body_bytes = len(direct.payload) if direct is not None else limits.request_bytes(request)
    prompt, completion = limits.estimate_tokens(request, body_bytes, cfg)
    cost = token_cost(spec, prompt, completion)
    needs_redis = plan is not None or isinstance(budget, RedisBudget)
    limiter = get_limiter(redis_url or cfg.redis_url, cfg.lease_s) if needs_redis else None
    # fairness is between runs: an in-process run without a run id is its top-level call (its trace root)
    run = context.run_id or f"local-{id(context.trace_root())}"
    routed = getattr(spec, "label", None)  # a deployment routing chose (llm.routing.RoutedModel)
    return Gate(cfg, plan, limiter, budget, tracer, run, prompt + completion, cost, routed, attempts)


def batch_gate(context: Any, tracer: TraceNode, spec: Any, request: dict[str, Any]) -> Gate | None:
    """A batched call's gate (llm.batch): its run's budget only, the cost at the batch price (the provider's batch
    queue is not governed by the live rate limits). None when no budget applies."""
    cfg = limits.config()
    redis_url = getattr(context.executor, "redis_url", None)
    budget = _budget(context, cfg, distributed=redis_url is not None)
    if budget is None:
        return None
    prompt, completion = limits.estimate_tokens(request, limits.request_bytes(request), cfg)
    cost = token_cost(spec, prompt, completion, getattr(spec, "batch_price_factor", 0.5))
    limiter = get_limiter(redis_url or cfg.redis_url, cfg.lease_s) if isinstance(budget, RedisBudget) else None
    run = context.run_id or f"local-{id(context.trace_root())}"
    return Gate(cfg, None, limiter, budget, tracer, run, prompt + completion, cost)


class Gate:
    """One governed call: admission, attempts and retries, pause on 429, correction and release."""

    __slots__ = ("cfg", "plan", "limiter", "budget", "tracer", "run", "estimate", "cost", "call_id", "member",
                 "admitted", "attempts", "waited_ms", "request", "_bases", "deployment")

    def __init__(
        self, cfg: limits.FlowConfig, plan: limits.Plan | None, limiter: Limiter | None,
        budget: MemoryLedger | RedisBudget | None, tracer: TraceNode, run: str, estimate: int, cost: float,
        deployment: str | None = None, attempts: list[dict[str, Any]] | None = None,
    ) -> None:
        self.cfg, self.plan, self.limiter, self.budget, self.tracer = cfg, plan, limiter, budget, tracer
        self.run, self.estimate, self.cost = run, estimate, cost
        self.call_id = f"{_TOKEN}{os.getpid():x}.{next(_calls)}"
        self.member: str | None = None  # the admitted attempt, until it is settled or released
        self.admitted = 0.0
        #: routing's deployment label: a pause found before sending means "cooling down, go elsewhere"
        self.deployment = deployment
        self.attempts: list[dict[str, Any]] = [] if attempts is None else attempts  # a route's: every deployment's
        self.waited_ms = 0.0
        self.request: dict[str, Any] | None = None
        self._bases = [scope.key for scope in plan.scopes] if plan is not None else []
        if plan is not None:
            tracer.update_attributes(limiter_scopes=list(plan.labels))

    @property
    def governed(self) -> bool:
        """A limit or a budget applies (a worker's first call of a run may find that its run has no budget)."""
        return self.plan is not None or self.budget is not None

    # -- sending ----------------------------------------------------------------------------------------------
    async def send(self, client: openai.AsyncOpenAI, direct: DirectCall | None, request: dict[str, Any]) -> Any:
        """The provider's answer, after as many attempts as the client's max_retries allows."""
        self.request = request
        once = None if direct is not None else _single_attempt_client(client)
        retries = client.max_retries
        for attempt in range(retries + 1):
            waited_s, reason = await self._admit(attempt)
            started = time.perf_counter()
            try:
                if once is not None:
                    response = await once.chat.completions.create(**request)
                else:
                    response = await direct.send_once(attempt)  # type: ignore[union-attr]
            except openai.APIStatusError as exc:
                status, headers = exc.status_code, exc.response.headers
                delay = server_delay(headers)
                self._record(attempt, waited_s, reason, started, status, delay, exc)
                self._release(0, 0.0)  # the provider answered with an error: it ran nothing
                if status == 429 or (status == 503 and delay is not None):
                    self._pause(delay if delay is not None and delay > 0 else retry_delay(attempt))
                if attempt == retries or not should_retry(status, headers):
                    raise
                await asyncio.sleep(_jittered(retry_delay(attempt, headers)))
            except openai.APIConnectionError as exc:  # timeouts included: the provider may have run the call
                self._record(attempt, waited_s, reason, started, None, None, exc)
                self._release(self.estimate, self.cost)
                if attempt == retries:
                    raise
                await asyncio.sleep(retry_delay(attempt))
            except BaseException as exc:  # cancelled, or an answer that is no chat completion: it may have run
                if not isinstance(exc, asyncio.CancelledError):
                    self._record(attempt, waited_s, reason, started, None, None, exc)
                self._release(self.estimate, self.cost)
                raise
            else:
                self._record(attempt, waited_s, reason, started, 200, None, None)
                return response
            flow_stats().retries += 1
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _admit(self, attempt: int) -> tuple[float, str | None]:
        """Wait until the limits, the pause and the budget let this attempt go; reserve its share."""
        member = f"{self.call_id}.{attempt}"
        estimate = (self.estimate, self.cost)
        waited, reason = 0.0, None
        if isinstance(self.budget, MemoryLedger):
            waited = await self.budget.reserve(member, estimate, self.run)
            reason = "budget" if waited > 0.001 else None
        if self.limiter is not None:
            try:
                waited_redis, redis_reason = await self._acquire(member, attempt)
            except BaseException:
                if isinstance(self.budget, MemoryLedger):
                    self.budget.settle(member, 0, 0.0)
                raise
            waited += waited_redis
            reason = redis_reason or reason
        waited = waited if reason is not None else 0.0  # not the script's round trip
        self.member, self.admitted = member, time.perf_counter()
        stats = flow_stats()
        if attempt == 0 and self.governed:
            self.tracer.update_attributes(limiter_estimate_tokens=self.estimate)
            stats.calls += 1
        stats.admissions += 1
        stats.reserved_tokens += self.estimate
        if reason is not None:
            stats.waited(reason, waited)
            metrics.record_limiter_wait(str(self.tracer.attributes.get("model", "")), waited)
        return waited, reason

    async def _acquire(self, member: str, attempt: int = 0) -> tuple[float, str | None]:
        assert self.limiter is not None
        cfg, plan, budget = self.cfg, self.plan, self.budget
        lease_ms = int(cfg.lease_s * 1000)
        ttl_ms = plan.ttl_ms if plan is not None else 0
        room = plan.queue.key if plan is not None else ""
        scopes = plan.scopes if plan is not None else ()

        def build(index: KeyIndex) -> dict[str, Any]:
            op: dict[str, Any] = {
                "o": "a", "m": member, "k": self.call_id, "u": self.run, "e": self.estimate, "l": lease_ms,
                "g": TICKET_GRACE_MS, "x": ttl_ms, "q": index.scope(room) if room else 0,
                "s": [[index.scope(base), s.rpm, s.tpm, s.window_ms, s.concurrency]
                      for base, s in zip(self._bases, scopes, strict=True)],
            }
            if isinstance(budget, RedisBudget):
                op["b"] = budget.op(index, (self.estimate, self.cost), cfg.budget_ttl_s)
            return op

        started, reason = time.perf_counter(), None
        try:
            while True:
                flow_stats().polls += 1
                try:
                    answer = await self.limiter.call(build)
                except FlowError as exc:
                    if plan is not None or not isinstance(budget, RedisBudget) or not budget.lookup:
                        raise
                    # only looking for a budget nobody said the run has (e.g. an in-process run given a run id,
                    # no Redis): go on without one rather than fail the call
                    logger.warning("run %s: no budget lookup (%s); calling without one", self.run, exc)
                    self.budget = None
                    return 0.0, None
                if answer["s"] == 1:
                    break
                if answer["s"] == -1:
                    raise BudgetExceeded(answer["r"], answer["lim"], answer["used"], answer["est"],
                                         answer["why"] == "reached", self.run)
                if answer["s"] == -2:
                    scope = answer["key"].removeprefix(limits.KEY_PREFIX)
                    raise FlowError(
                        f"this call's estimate of {answer['est']} tokens is more than the tpm limit {answer['lim']} "
                        f"of {scope}: it can never be sent; set max_tokens, shorten the prompt or raise the limit"
                    )
                reason = answer["r"]
                if reason == "pause" and self.deployment is not None and (attempt == 0 or answer["w"] > 1000):
                    if room:
                        self.limiter.submit(lambda index: {"o": "l", "q": index.scope(room), "k": self.call_id},
                                            False)
                    raise Cooling(f"{self.deployment} is cooling down for {answer['w'] / 1000:.1f} s")
                await self.limiter.sleep(room, _pace(reason, answer["w"] / 1000), answer["p"])
        except asyncio.CancelledError:
            if room:
                self.limiter.submit(lambda index: {"o": "l", "q": index.scope(room), "k": self.call_id}, False)
            raise
        if answer.get("nb") and isinstance(budget, RedisBudget):
            if budget.lookup:
                _no_budget(self.run)
            self.budget = None
        lease = Lease([base for base, s in zip(self._bases, scopes, strict=True) if s.concurrency],
                      self.budget.key if isinstance(self.budget, RedisBudget) else None)
        if lease.slots or lease.budget:
            self.limiter.hold(member, lease)
        return time.perf_counter() - started, reason

    # -- after an attempt -------------------------------------------------------------------------------------
    def _record(
        self, attempt: int, waited_s: float, reason: str | None, started: float, status: int | None,
        retry_after: float | None, error: BaseException | None,
    ) -> None:
        entry: dict[str, Any] = {
            "attempt": attempt, "status": status, "wait_ms": round(waited_s * 1000, 1), "waited_for": reason,
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if retry_after is not None:
            entry["retry_after_s"] = round(retry_after, 3)
        if self.deployment is not None:
            entry["deployment"] = self.deployment
        if error is not None:
            entry["error"] = f"{type(error).__name__}: {error}"[:300]
        self.attempts.append(entry)
        self.waited_ms += entry["wait_ms"]
        if status == 429:
            flow_stats().rate_limited += 1
            metrics.record_rate_limited(str(self.tracer.attributes.get("model", "")))
        if not self.governed:
            return
        self.tracer.update_attributes(llm_attempts=self.attempts, limiter_wait_ms=round(self.waited_ms, 1))
        if reason is not None:
            self.tracer.log(f"attempt {attempt} waited {entry['wait_ms']:g} ms for {reason}")

    def _pause(self, seconds: float) -> None:
        """Pause the model's calls on the whole fleet (every process checks the pause before sending)."""
        if self.limiter is None or self.plan is None:
            return
        seconds = min(seconds, limits.MAX_PAUSE_S)
        base = self.plan.pause.key
        ttl_ms = int(seconds * 1000) + 60_000
        self.limiter.submit(
            lambda index: {"o": "p", "s": [index.scope(base)], "ms": seconds * 1000, "x": ttl_ms}, False
        )
        flow_stats().pauses += 1
        self.tracer.log(
            f"the provider asked to wait: calls to {self.plan.pause.name} paused fleet-wide for {seconds:.2f} s",
            "warning",
        )

    def _release(self, tokens: float, cost: float) -> None:
        """The attempt is over: correct its reservation to `tokens` / `cost` and free what it held."""
        member, self.member = self.member, None
        if member is None:
            return
        held_ms = (time.perf_counter() - self.admitted) * 1000
        if self.governed:
            flow_stats().corrected(int(tokens - self.estimate))
        budget = self.budget
        if isinstance(budget, MemoryLedger):
            budget.settle(member, tokens, cost)
        if self.limiter is None:
            return
        self.limiter.release(member)
        delta = int(tokens - self.estimate)
        scopes = self.plan.scopes if self.plan is not None else ()
        if not (isinstance(budget, RedisBudget) or any(s.concurrency or (s.tpm and delta) for s in scopes)):
            return
        ttl_s = self.cfg.budget_ttl_s

        def build(index: KeyIndex) -> dict[str, Any]:
            op: dict[str, Any] = {
                "o": "s", "m": member, "h": held_ms,
                "s": [[index.scope(base), delta if s.tpm else 0, 1 if s.concurrency else 0,
                       s.window_ms / s.tpm if s.tpm else 0] for base, s in zip(self._bases, scopes, strict=True)],
            }
            if isinstance(budget, RedisBudget):
                op["b"] = [index.budget(budget.key), int(tokens), cost, ttl_s]
            return op

        self.limiter.submit(build, False)
        if self.plan is not None:
            self.limiter.wake(self.plan.queue.key)

    # -- batch mode -------------------------------------------------------------------------------------------
    async def commit(self) -> None:
        """A call going in a batch: admitted against the budget and counted at once at its estimate (it is paid
        when its batch runs, hours later, in whichever process reads the answer); raises BudgetExceeded."""
        await self._admit(0)
        self._release(self.estimate, self.cost)

    async def correct(self, tokens: dict[str, int], cost: float | None) -> None:
        """A batched call answered: its real usage replaces the estimate `commit` counted (a gate made for the
        same request). When the budget is spent by now, the estimate stands."""
        used = tokens.get("total", tokens.get("prompt", 0) + tokens.get("completion", 0)) if tokens else self.estimate
        delta = (used - self.estimate, (self.cost if cost is None else cost) - self.cost)
        self.estimate, self.cost = 0, 0.0
        try:
            await self._admit(0)
        except BudgetExceeded:
            return
        self._release(*delta)

    # -- the node's hooks -------------------------------------------------------------------------------------
    def settle(self, tokens: dict[str, int], cost: float | None) -> None:
        """The call succeeded: its real usage replaces the estimate (kept when the provider reported none)."""
        used = tokens.get("total", tokens.get("prompt", 0) + tokens.get("completion", 0)) if tokens else None
        used = self.estimate if used is None else used
        if cost is None:
            cost = self.cost if not tokens else 0.0
        if self.governed:
            self.tracer.update_attributes(limiter_correction_tokens=int(used - self.estimate))
        self._release(used, cost)

    def failed(self, exc: BaseException, failure: Result) -> Result:
        """The call failed: release what it holds (it reached the provider: its estimate is counted), keep the
        request in the trace, and FAIL with the budget's record when a budget stopped it."""
        self._release(self.estimate, self.cost)
        if self.request is not None and self.governed:
            self.tracer.update_attributes(request={k: v for k, v in self.request.items() if k != "extra_headers"})
        if isinstance(exc, BudgetExceeded):
            flow_stats().budget_exceeded += 1
            self.tracer.update_attributes(budget_exceeded=exc.record.json())
            return Result(Status.FAIL, exc.record)
        return failure

    def abandon(self) -> None:
        """The node was cancelled: free what it holds now, counting its estimate."""
        self._release(self.estimate, self.cost)
