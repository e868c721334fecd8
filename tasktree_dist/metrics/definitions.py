"""Every metric this library exports, in one place (names are part of the operator's interface: dashboards and
alerts use them). Registered on prometheus_client's default registry, so an application that already serves it
(its own /metrics) exports these too.

Label values are bounded: tree names, queue names, model names, unit status (OK/FAIL), run states. Never a run id
or a node address (unbounded cardinality).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Seconds: from sub-millisecond units to LLM calls of minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# -- units (worker side: started/finished/running; coordinator side: sent/in flight) ---------------------------------
UNITS_SENT = Counter(
    "tasktree_units_sent_total", "Units a coordinator sent to the broker (re-sends included)", ["tree", "queue"]
)
UNITS_STARTED = Counter("tasktree_units_started_total", "Units a worker started running", ["tree", "queue"])
UNITS_FINISHED = Counter(
    "tasktree_units_finished_total", "Units a worker finished, by status (OK or FAIL)", ["tree", "queue", "status"]
)
UNIT_QUEUE_WAIT = Histogram(
    "tasktree_unit_queue_wait_seconds", "Time from sending a unit to a worker starting it (broker + prefetch)",
    ["tree", "queue"], buckets=DURATION_BUCKETS,
)
UNIT_RUN = Histogram(
    "tasktree_unit_run_seconds", "Time a worker spent on a unit, by status", ["tree", "queue", "status"],
    buckets=DURATION_BUCKETS,
)
UNITS_RUNNING = Gauge("tasktree_units_running", "Units running on this worker process now")
UNITS_IN_FLIGHT = Gauge("tasktree_units_in_flight", "Units this coordinator process sent and waits for")

# -- runs ---------------------------------------------------------------------------------------------------------
RUN_TRANSITIONS = Counter(
    "tasktree_run_transitions_total", "Run state changes made by this process (queued, running, succeeded...)",
    ["state"],
)

RUNS_FINISHED = Counter(
    "tasktree_runs_finished_total", "Runs whose end this process recorded (their coordinator), by tree and final "
    "state (succeeded, failed, cancelled)", ["tree", "state"],
)
RUN_DURATION = Histogram(
    "tasktree_run_seconds", "Run duration from its start to its end, by tree and final state", ["tree", "state"],
    buckets=(0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0),
)
RUN_COST = Counter("tasktree_run_cost_usd_total", "LLM cost of finished runs in US dollars, by tree", ["tree"])
RUN_TOKENS = Counter("tasktree_run_tokens_total", "LLM tokens of finished runs, by tree", ["tree"])

# -- LLM ----------------------------------------------------------------------------------------------------------
LLM_CALLS = Counter(
    "tasktree_llm_calls_total", "LLM calls by model and outcome (ok, rate_limited, error)", ["model", "status"]
)
LLM_LATENCY = Histogram(
    "tasktree_llm_call_seconds", "LLM call latency (request to full answer)", ["model"], buckets=DURATION_BUCKETS
)
LLM_TOKENS = Counter(
    "tasktree_llm_tokens_total", "LLM tokens by model and kind (prompt, completion)", ["model", "kind"]
)
LLM_COST = Counter("tasktree_llm_cost_usd_total", "LLM cost in US dollars by model", ["model"])
#: Fed by the LLM flow control (limiter): see hooks.record_limiter_wait / record_rate_limited.
LLM_LIMITER_WAIT = Histogram(
    "tasktree_llm_limiter_wait_seconds", "Time an LLM call waited for the rate limiter before it was sent", ["model"],
    buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
LLM_RATE_LIMITED = Counter(
    "tasktree_llm_rate_limited_total", "HTTP 429 answers from LLM providers (each one, retried or not)", ["model"]
)

# -- trouble ------------------------------------------------------------------------------------------------------
REDIS_ERRORS = Counter(
    "tasktree_redis_errors_total", "Redis commands that failed (connection, timeout) and were retried"
)
BROKER_ERRORS = Counter("tasktree_broker_errors_total", "Attempts to send units to the broker that failed")
LEASE_EXPIRIES = Counter(
    "tasktree_lease_expiries_total", "Units found held by a process whose heartbeat (lease) expired", ["tree"]
)
UNITS_HANDED_BACK = Counter(
    "tasktree_units_handed_back_total",
    "Units a worker handed back to their queue because it cannot run their tree (not registered, other version)",
    ["tree", "queue"],
)
UNITS_UNRUNNABLE = Counter(
    "tasktree_units_unrunnable_total",
    "Units FAILed because no live worker served their queue with their tree (TASKTREE_UNRUNNABLE_LIMIT)",
    ["tree", "queue"],
)
UNITS_REDISPATCHED = Counter(
    "tasktree_units_redispatched_total",
    "Units sent again (reason: lease_expired, in_transit, redis_outage) or given up (gave_up)", ["tree", "reason"],
)
