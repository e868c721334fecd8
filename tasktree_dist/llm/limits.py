"""Which flow-control limits govern an LLM call, and what the call may cost before it is sent.

Limits are declared on the objects (`LLMProvider(..., rpm=, tpm=, concurrency=)`, `LLMModel(...)`, the same
fields) and in the settings (`TASKTREE_LLM_LIMITS`, keyed by model name or provider base URL); an object's field
wins over the setting's. Each level that has limits becomes a `Scope`: one set of counters in Redis, shared by
every process of the fleet (limiter.py). A call is governed when any level applies to it; an ungoverned call
costs nothing here (no Redis round trip at all).

Estimates need no tokenizer: the request's JSON size divided by `TASKTREE_LLM_BYTES_PER_TOKEN` (3 bytes a token
over-counts English, which runs at about 4, and is close for CJK text at 3 bytes a character), plus the
completion the call may produce (`max_tokens` / `max_completion_tokens` times `n`, or
`TASKTREE_LLM_DEFAULT_MAX_TOKENS`). The estimate is reserved before sending and corrected with the real usage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core.redact import redact_url

#: The fields a limit may set, in TASKTREE_LLM_LIMITS entries and on LLMProvider / LLMModel.
LIMIT_FIELDS = ("rpm", "tpm", "window_s", "concurrency")
#: Longest fleet-wide pause one answer can ask for (openai-python gives up on a longer Retry-After too).
MAX_PAUSE_S = 120.0


@dataclass(frozen=True, kw_only=True)
class FlowLimits:
    """Fleet-wide limits of a provider or a model (LLMProvider and LLMModel carry these keyword fields).

    `rpm` requests and `tpm` tokens per window of `window_s` seconds (default TASKTREE_LLM_WINDOW_S, 60: so
    "per minute"); `concurrency` calls in flight at once, per value of `concurrency_key(blackboard)` when given
    (e.g. a tenant id), else for the whole provider / model.
    """

    rpm: int | None = None
    tpm: int | None = None
    window_s: float | None = None
    concurrency: int | None = None
    concurrency_key: Callable[[Any], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"{type(self).__name__}.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class FlowConfig:
    """The flow-control settings (core.settings: TASKTREE_LLM_* and TASKTREE_REDIS_URL), checked once."""

    redis_url: str
    limits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    window_s: float = 60.0
    margin_s: float = 0.25
    lease_s: float = 30.0
    default_max_tokens: int = 1024
    bytes_per_token: float = 3.0
    run_max_cost_usd: float | None = None
    run_max_total_tokens: int | None = None
    budget_ttl_s: int = 86400

    @classmethod
    def from_settings(cls, settings: Any) -> FlowConfig:
        limits: dict[str, dict[str, float]] = {}
        for name, entry in (settings.llm_limits or {}).items():
            unknown = set(entry) - set(LIMIT_FIELDS)
            bad = [key for key, value in entry.items() if not value > 0]
            if unknown or bad:
                raise ValueError(
                    f"TASKTREE_LLM_LIMITS[{name!r}]: unknown fields {sorted(unknown)} or non-positive values "
                    f"{sorted(bad)}; allowed: {', '.join(LIMIT_FIELDS)} (positive numbers)"
                )
            limits[_normal(name)] = dict(entry)
        return cls(
            redis_url=settings.redis_url, limits=limits, window_s=settings.llm_window_s,
            margin_s=settings.llm_window_margin_s, lease_s=settings.llm_lease_s,
            default_max_tokens=settings.llm_default_max_tokens, bytes_per_token=settings.llm_bytes_per_token,
            run_max_cost_usd=settings.llm_run_max_cost_usd, run_max_total_tokens=settings.llm_run_max_total_tokens,
            budget_ttl_s=settings.llm_budget_ttl_s,
        )

    @property
    def run_budget(self) -> bool:
        return self.run_max_cost_usd is not None or self.run_max_total_tokens is not None


_config: FlowConfig | None = None


def configure(settings: Any = None) -> None:
    """Read flow control from `settings` (a TasktreeSettings) from now on; None: from the TASKTREE_* environment
    (core.settings.get_settings()), read again on next use."""
    global _config
    _config = None if settings is None else FlowConfig.from_settings(settings)


def config() -> FlowConfig:
    global _config
    if _config is None:
        from ..core.settings import get_settings  # on first use: pydantic-settings is not needed by ungoverned runs

        _config = FlowConfig.from_settings(get_settings())
    return _config


#: Where a scope's counters live in Redis: KEY_PREFIX + its name (limiter.py derives its six keys from that). One
#: hash tag for all of flow control (scopes and run budgets): a limiter script call spans several scopes, so on a
#: Redis Cluster they share a slot (one master serves flow control; runs spread over the others).
KEY_PREFIX = "tasktree:{flow}:"


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of counters in Redis: a provider ("p:<base url>"), a model ("m:<base url>|<model>"), or one
    concurrency key of either ("...#<key>")."""

    name: str
    rpm: int = 0
    tpm: int = 0
    window_ms: float = 0.0  # the limit's window plus the client's margin
    concurrency: int = 0
    key: str = ""  # KEY_PREFIX + name

    def describe(self, margin_s: float) -> str:
        parts = [self.name]
        window = f"{(self.window_ms / 1000 - margin_s):g}s"
        if self.rpm:
            parts.append(f"rpm={self.rpm}/{window}")
        if self.tpm:
            parts.append(f"tpm={self.tpm}/{window}")
        if self.concurrency:
            parts.append(f"concurrency={self.concurrency}")
        return " ".join(parts)


def _scope(name: str, rpm: int = 0, tpm: int = 0, window_ms: float = 0.0, concurrency: int = 0) -> Scope:
    return Scope(name, rpm, tpm, window_ms, concurrency, KEY_PREFIX + name)


@dataclass(frozen=True, slots=True)
class Plan:
    """The scopes that govern one call: `pause` is the model's (a 429 pauses it), `queue` the one whose waiting
    room orders this call's waits (the most specific: a concurrency key's, else the model's); `labels` for the
    trace."""

    scopes: tuple[Scope, ...]
    pause: Scope
    queue: Scope
    labels: tuple[str, ...]
    ttl_ms: int  # how long the scopes' keys outlive their last use: two windows, two leases, a longest pause


def _normal(name: str) -> str:
    """A model name or base URL as scope names hold it: no trailing slash, no password (scope names become Redis
    keys and metrics labels)."""
    return redact_url(name.rstrip("/"))


def _level(obj: Any, entry: Mapping[str, float] | None) -> dict[str, Any] | None:
    """One level's limits: the object's fields over the setting's entry; None when neither says anything."""
    values: dict[str, Any] = dict(entry) if entry is not None else {}
    for name in LIMIT_FIELDS:
        value = getattr(obj, name, None)
        if value is not None:
            values[name] = value
    key_func = getattr(obj, "concurrency_key", None)
    if key_func is not None:
        values["concurrency_key"] = key_func
    return values if values or entry is not None else None


def _scopes(name: str, values: dict[str, Any], blackboard: Any, cfg: FlowConfig) -> list[Scope]:
    window_ms = (float(values.get("window_s") or cfg.window_s) + cfg.margin_s) * 1000
    rpm, tpm = int(values.get("rpm") or 0), int(values.get("tpm") or 0)
    concurrency = int(values.get("concurrency") or 0)
    key_func = values.get("concurrency_key")
    if not concurrency or key_func is None:
        return [_scope(name, rpm, tpm, window_ms, concurrency)]
    keyed = _scope(f"{name}#{key_func(blackboard)}", concurrency=concurrency)
    return [_scope(name, rpm, tpm, window_ms), keyed]


def _build(model_name: str, base_url: str, levels: tuple[Any, Any], blackboard: Any, cfg: FlowConfig) -> Plan:
    provider_level, model_level = levels
    scopes: list[Scope] = []
    if provider_level is not None:
        scopes += _scopes(f"p:{base_url}", provider_level, blackboard, cfg)
    model_scopes = _scopes(f"m:{base_url}|{model_name}", model_level or {}, blackboard, cfg)
    scopes += model_scopes
    keyed = [scope for scope in scopes if "#" in scope.name]
    ttl_ms = max(max(scope.window_ms for scope in scopes) * 2, cfg.lease_s * 2000, MAX_PAUSE_S * 1000) + 60_000
    return Plan(tuple(scopes), pause=model_scopes[0], queue=keyed[-1] if keyed else model_scopes[0],
                labels=tuple(scope.describe(cfg.margin_s) for scope in scopes), ttl_ms=int(ttl_ms))


#: Plans by (model object, model name, base URL): resolving limits is on every call's path.
PLANS_KEPT = 1024
_plans: dict[tuple[int, str, str], tuple[Any, FlowConfig, tuple[Any, Any] | None, Plan | None]] = {}


def may_govern(spec: Any, cfg: FlowConfig) -> bool:
    """Whether any limit could apply to a call of `spec` (the LLMModel, or None), before looking closer."""
    if cfg.limits or getattr(spec, "always_governed", False):
        return True
    for obj in (spec, getattr(spec, "provider", None)):
        if obj is not None and any(getattr(obj, name, None) is not None for name in LIMIT_FIELDS):
            return True
    return False


def plan(model_name: str, spec: Any, base_url: str, blackboard: Any, cfg: FlowConfig) -> Plan | None:
    """The scopes governing a call to `model_name` at `base_url` (spec: the LLMModel, if any); None: ungoverned.
    Worked out once per model object, except the concurrency keys taken from the blackboard."""
    base_url = _normal(base_url)
    cache_key = (id(spec), model_name, base_url)
    cached = _plans.get(cache_key)
    if cached is None or cached[0] is not spec or cached[1] is not cfg:
        if len(_plans) >= PLANS_KEPT:
            _plans.clear()
        provider = getattr(spec, "provider", None)
        levels: tuple[Any, Any] | None = (
            _level(provider, cfg.limits.get(base_url) if cfg.limits else None),
            _level(spec, cfg.limits.get(model_name) if cfg.limits else None),
        )
        if levels == (None, None):
            # a deployment routing chooses is governed without limits: its cooldown is the model scope's pause
            levels = (None, {}) if getattr(spec, "always_governed", False) else None
        keyed = levels is not None and any(level and "concurrency_key" in level for level in levels)
        static = None if levels is None or keyed else _build(model_name, base_url, levels, None, cfg)
        cached = _plans[cache_key] = (spec, cfg, levels, static)
    _, _, levels, static = cached
    if levels is None or static is not None:
        return static
    return _build(model_name, base_url, levels, blackboard, cfg)


def estimate_tokens(request: Mapping[str, Any], body_bytes: int, cfg: FlowConfig) -> tuple[int, int]:
    """(prompt, completion) tokens the call may use, from the request body's size and its completion cap."""
    extra = request.get("extra_body") or {}
    cap = (
        request.get("max_completion_tokens") or request.get("max_tokens")
        or extra.get("max_completion_tokens") or extra.get("max_tokens") or cfg.default_max_tokens
    )
    choices = request.get("n") or extra.get("n") or 1
    return math.ceil(body_bytes / cfg.bytes_per_token), int(cap) * int(choices)


def request_bytes(request: Mapping[str, Any]) -> int:
    """The size of what a request sends that costs tokens (the direct transport measures its whole body)."""
    return len(orjson.dumps([request.get("messages"), request.get("tools")], default=str))
