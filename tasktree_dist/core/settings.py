"""Every environment variable the library reads, in one validated model (pydantic-settings, prefix TASKTREE_).

Each field's description is the documentation of its variable (docs/configuration.md is generated from them).
The model is read once per process (`get_settings()`); modules read it when they need a value, never copying a
value at import. Celery's configuration is derived from it in distributed/celery_config.py.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .sentinel import is_sentinel
from .sentinel import parse as parse_sentinel


class TasktreeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKTREE_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker: redis:// or amqp://")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/1", description="Snapshots, caches, signals and completions: redis://, rediss://, or "
        "a master found through Sentinel: redis+sentinel://host:26379,host2:26379/<master name>/<db> "
        "(rediss+sentinel:// for TLS)"
    )
    imports: str = Field("", description="Comma-separated modules a worker imports at start (they build trees)")
    queue: str = Field("tasktree", description="Default work queue for shipped units")
    worker_concurrency: int = Field(64, ge=1, description="Units one worker process runs at once (threads pool)")
    batch_size: int = Field(
        256, ge=1, description="Most Gather/Parallel units shipped in one message (at most a quarter of the fan-out's "
        "concurrency limit): Celery's cost is per message"
    )
    dispatch_lookahead: float = Field(
        1.0, ge=0, description="Units a concurrency-limited Gather/Parallel sends beyond its limit, as a share of "
        "the limit: they wait on the workers for a slot of the fan-out (held fleet-wide in Redis), so a freed slot "
        "is refilled where it was freed, not through the coordinator (their messages hold worker pool threads "
        "meanwhile). 0: send no more than the limit"
    )
    gate_poll_s: float = Field(
        0.02, gt=0, description="Seconds between a worker's asks for free fan-out slots while units wait there for "
        "one (a slot freed on the same worker goes to its waiting unit at once)"
    )
    snapshot_ttl: int = Field(3600, ge=1, description="Seconds a blackboard snapshot lives in Redis")
    reply_ttl: int = Field(3600, ge=1, description="Seconds completions and done-markers live in Redis")
    max_blackboard_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest encoded blackboard shipped")
    lease_ttl: float = Field(
        30.0, gt=0, description="Seconds a running unit's lease lives unrenewed: a dead worker's unit is sent again"
    )
    unrunnable_limit: float = Field(
        60.0, gt=0, description="Seconds a sent unit waits while no live worker serves its queue at all; then it "
        "FAILs naming the live workers and their trees (a served queue without its tree fails it at once)"
    )
    stuck_loop_s: float = Field(
        120.0, ge=0, description="Seconds a worker's event loop may stay blocked (by user code) before the worker "
        "logs the blocking stack and exits, to be restarted (0: never)"
    )
    health_file: str = Field(
        "", description="A worker touches this file every few seconds while its event loop answers: a container "
        "health probe checks its age (e.g. find FILE -mmin -1) without starting Python; empty: none"
    )
    max_dispatches: int = Field(3, ge=1, description="Times a unit is sent before its workers' deaths FAIL it")
    prefetch_multiplier: int = Field(
        1, ge=1, description="Messages a worker reserves per pool thread (Celery's prefetch multiplier)"
    )
    runs_queue: str = Field("tasktree.runs", description="Queue of submitted runs' coordinators (tasktree.coordinate)")
    run_retention: int = Field(
        7 * 24 * 3600, ge=60, description="Seconds run records, their events, unit records and traces live in Redis"
    )
    coordinator_slots: int = Field(
        16, ge=1, description="Runs one worker process coordinates at once (their tasktree.coordinate tasks wait in "
        "at most half of its pool threads, so units always have threads; the other runs go on without one)"
    )
    events_max: int = Field(10_000, ge=100, description="Most events kept per run (older ones are trimmed)")
    redis_outage_limit: float = Field(
        60.0, gt=0, description="Seconds a run waits for an unreachable Redis before it fails naming the outage"
    )
    redis_wait_replicas: int = Field(
        1, ge=0, description="Replicas that must acknowledge (Redis WAIT) a run record change or a unit completion "
        "before it counts as written, when the master has that many online (fewer: as many as it has); 0: never wait"
    )
    redis_wait_timeout_ms: int = Field(
        100, ge=1, description="Longest a write waits for its replica acknowledgements (then it goes on, logged)"
    )
    trace_flush_s: float = Field(1.0, gt=0, description="Seconds between writes of a running run's trace to Redis")
    trace_fanout_max: int = Field(
        200, ge=0, description="Children of a distributed Gather kept in the coordinator's trace (the first ones and "
        "up to 100 failed); the others are read from the run's unit records on demand. 0 keeps every child"
    )
    # LLM flow control (tasktree_dist/llm/limits.py): limits shared by every process through TASKTREE_REDIS_URL
    llm_limits: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description='JSON {"<model name or provider base URL>": {"rpm", "tpm", "window_s", "concurrency"}}; an '
        "empty {} only shares 429 back-off across the fleet",
    )
    llm_window_s: float = Field(60.0, gt=0, description="Window of rpm/tpm limits that set no window_s")
    llm_window_margin_s: float = Field(
        0.25, ge=0, description="Added to each limit window on the client, so send-to-arrival jitter never puts a "
        "provider's window over its limit"
    )
    llm_lease_s: float = Field(
        30.0, gt=0, description="Seconds a concurrency slot or budget reservation lives unrenewed: a dead "
        "process's slots come back"
    )
    llm_default_max_tokens: int = Field(
        1024, ge=1, description="Completion tokens reserved for a call that sets no max_tokens"
    )
    llm_bytes_per_token: float = Field(3.0, gt=0, description="Request bytes per token in the pre-send estimate")
    llm_run_max_cost_usd: float | None = Field(None, gt=0, description="Budget of every run without its own")
    llm_run_max_total_tokens: int | None = Field(None, gt=0, description="Budget of every run without its own")
    llm_budget_ttl_s: int = Field(
        86400, ge=60, description="Seconds a run's budget counters live in Redis after their last change"
    )
    llm_connections: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Named LLM connections for agent specs (`llm: {connection: NAME}`), JSON: "
        '{"NAME": {"base_url": "...", "api_key_env": "ENV_VAR_HOLDING_THE_KEY"}}; a spec\'s `connections:` wins'
    )
    # LLM routing (tasktree_dist/llm/routing.py): deployments and fallbacks of models named by a string (specs)
    llm_deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='JSON {"<model name>": {"deployments": [{"base_url", "api_key_env" (a variable\'s name) or '
        '"api_key", "model_name", "weight", "rpm", "tpm", "window_s", "concurrency", "input_price_per_m", '
        '"output_price_per_m"}], "fallbacks": ["<model name>"], "context_window_fallbacks": ["<model name>"], '
        '"input_price_per_m", "output_price_per_m"}}: how calls to a model given by name are routed',
    )
    llm_cooldown_s: float = Field(
        10.0, gt=0, description="Seconds a deployment that failed a call (429, 5xx, timeout, connection error, after "
        "its retries) gets no calls from any process of the fleet"
    )
    llm_route_wait_s: float = Field(
        60.0, ge=0, description="Longest a routed call waits for a deployment to come out of cooldown when every "
        "one it may use is cooling down (the call's own timeout when shorter); then it fails naming them"
    )
    # LLM batch mode (tasktree_dist/llm/batch.py): the provider's Batch API, pending batches shared in Redis
    llm_batch_max_requests: int = Field(
        10_000, ge=1, le=50_000, description="Requests in a pending batch that make it go to the provider at once "
        "(the OpenAI Batch API takes at most 50,000 per file)"
    )
    llm_batch_max_wait_s: float = Field(
        60.0, gt=0, description="Seconds a pending batch waits for more requests before it goes as it is"
    )
    llm_batch_poll_s: float = Field(5.0, gt=0, description="Seconds between two looks at a batch the provider runs")
    llm_batch_lease_s: float = Field(
        30.0, gt=0, description="Seconds a process holds the right to poll a batch, or to submit a sealed one, "
        "without renewing it (one poller per batch on the fleet; a dead poller's or submitter's batch is taken over)"
    )
    llm_batch_ttl_s: int = Field(
        3 * 86400, ge=60, description="Seconds batch records and results live in Redis (a batch's window is 24 h), "
        "and the longest a run waits, parked, for a batched call's answer (then its fallback applies)"
    )
    metrics_port: str = Field(
        "0", description="Prometheus metrics of each worker/coordinator process: 0 off, a port, low-high, or auto"
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds (0.0.0.0 in containers)")
    # Access control of `tasktree serve` (tasktree_dist/web/tokens.py, docs/security.md)
    api_tokens: str = Field(
        "", description='JSON list of API tokens: [{"name", "token" | "sha256", "scopes": [read, submit, signal, '
        'control, admin], "labels": {...}}]; with any token configured every route but /api/health needs one'
    )
    tokens_file: str = Field("", description="A file holding the same JSON list as TASKTREE_API_TOKENS (both merge)")
    control_token: str = Field("", description="A token with every scope, named `control` (kept from before tokens)")
    api_token: str = Field("", description="The token the `tasktree` command sends to a server (Bearer)")
    stream_ticket_key: str = Field(
        "", description="Secret that signs the board's live-stream tickets; give every `tasktree serve` replica "
        "behind one address the same value (unset: a random key per process, voided by a restart)"
    )
    auth_failures_per_minute: int = Field(
        10, ge=1, description="Failed authentications one client address may make per minute before 429"
    )
    audit_max: int = Field(100_000, ge=100, description="Most entries kept in the fleet-wide audit stream")
    audit_ttl: int = Field(
        90 * 24 * 3600, ge=60, description="Seconds the audit stream lives after its last entry"
    )
    # TLS to Redis: applied to every rediss:// URL (broker and state)
    ssl_ca_certs: str = Field("", description="CA bundle that signs the Redis server's certificate (rediss://)")
    ssl_certfile: str = Field("", description="Client certificate for Redis TLS (rediss://), when it asks for one")
    ssl_keyfile: str = Field("", description="Private key of TASKTREE_SSL_CERTFILE")
    # How LLM calls are sent and how processes run (tasktree_dist/llm/clients.py, core/tuning.py, core/log.py)
    llm_transport: Literal["direct", "direct-aiohttp", "openai", "openai-httpx"] = Field(
        "direct", description="How the LLM node sends non-streaming calls: direct (orjson and a lean HTTP/1.1 "
        "client, a fraction of openai-python's CPU), direct-aiohttp (the same over an aiohttp session), openai "
        "(every call through openai-python's create(), over aiohttp: for instrumentation that hooks create()) or "
        "openai-httpx (create() over httpx). Streams always go through create()"
    )
    uvloop: bool = Field(True, description="Event loops of workers, benchmarks and the fake LLM server use uvloop "
                         "where it is installed (C loop and transports: about a third less CPU per LLM call)")
    gc_freeze: bool = Field(True, description="Freeze the objects alive once a process has loaded its LLM transport "
                            "or started as a worker, so full garbage collections no longer walk them")
    disable_logging: bool = Field(
        False, validation_alias="DISABLE_TASKTREE_LOGGING",
        description="Silence the library's logger (tinytasktree's variable, without the TASKTREE_ prefix; "
        "set_logging_disabled() switches it at run time)",
    )

    @property
    def import_list(self) -> list[str]:
        return [name.strip() for name in self.imports.split(",") if name.strip()]

    @model_validator(mode="after")
    def _redis_tls(self) -> TasktreeSettings:
        """The state URL carries the TLS files as redis-py query arguments, so every client made from it (run
        store, dispatch, heartbeats, limiter, caches) verifies the server the same way; the broker gets them
        through Celery's broker_use_ssl."""
        self.redis_url = self.with_tls(self.redis_url)
        for variable, url in (("TASKTREE_REDIS_URL", self.redis_url), ("TASKTREE_BROKER_URL", self.broker_url)):
            if is_sentinel(url):  # a malformed Sentinel URL fails at start, naming the wrong part
                try:
                    parse_sentinel(url)
                except ValueError as exc:
                    raise ValueError(f"{variable}: {exc}") from None
        return self

    def ssl_options(self) -> dict[str, str]:
        """redis-py's keyword arguments for a rediss:// connection: the server's certificate is always checked."""
        options = {"ssl_cert_reqs": "required"}
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                options[name] = getattr(self, name)
        return options

    def with_tls(self, url: str) -> str:
        """`url` with the TLS settings added as query arguments when it is rediss:// (ones it names win)."""
        parts = urlsplit(url)
        if parts.scheme not in ("rediss", "rediss+sentinel", "rediss+cluster"):
            return url
        query = {**self.ssl_options(), **dict(parse_qsl(parts.query))}
        return urlunsplit(parts._replace(query=urlencode(query)))


@lru_cache
def get_settings() -> TasktreeSettings:
    """The process's settings, read from the environment on first use."""
    return TasktreeSettings()
