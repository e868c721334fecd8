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

#: The fields a limit may set, in TASKTREE_LLM_LIMITS entries and on LLMProvider / LLMModel.
LIMIT_FIELDS = ("rpm", "tpm", "window_s", "concurrency")


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
    """The flow-control settings (broker_config's TASKTREE_LLM_* and TASKTREE_REDIS_URL), checked once."""

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
    (broker_config.get_settings()), read again on next use."""
    global _config
    _config = None if settings is None else FlowConfig.from_settings(settings)


def config() -> FlowConfig:
    global _config
    if _config is None:
        from broker_config import get_settings  # on first use: pydantic-settings is not needed by ungoverned runs

        _config = FlowConfig.from_settings(get_settings())
    return _config


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of counters in Redis: a provider, a model, or one concurrency key of either."""

    key: str
    rpm: int = 0
    tpm: int = 0
    window_ms: float = 0.0  # the limit's window plus the client's margin
    concurrency: int = 0

    def describe(self, margin_s: float) -> str:
        parts = [self.key]
        window = f"{(self.window_ms / 1000 - margin_s):g}s"
        if self.rpm:
            parts.append(f"rpm={self.rpm}/{window}")
        if self.tpm:
            parts.append(f"tpm={self.tpm}/{window}")
        if self.concurrency:
            parts.append(f"concurrency={self.concurrency}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Plan:
    """The scopes that govern one call: `pause` is the model's (a 429 pauses it), `queue` the one whose waiting
    room orders this call's waits (the most specific: a concurrency key's, else the model's)."""

    scopes: tuple[Scope, ...]
    pause: Scope
    queue: Scope


def _normal(name: str) -> str:
    return name.rstrip("/")


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


def _scopes(key: str, values: dict[str, Any], blackboard: Any, cfg: FlowConfig) -> list[Scope]:
    window_ms = (float(values.get("window_s") or cfg.window_s) + cfg.margin_s) * 1000
    rpm, tpm = int(values.get("rpm") or 0), int(values.get("tpm") or 0)
    concurrency = int(values.get("concurrency") or 0)
    key_func = values.get("concurrency_key")
    if not concurrency or key_func is None:
        return [Scope(key, rpm, tpm, window_ms, concurrency)]
    keyed = Scope(f"{key}#{key_func(blackboard)}", concurrency=concurrency)
    return [Scope(key, rpm, tpm, window_ms), keyed]


def plan(model_name: str, spec: Any, base_url: str, blackboard: Any, cfg: FlowConfig) -> Plan | None:
    """The scopes governing a call to `model_name` at `base_url` (spec: the LLMModel, if any); None: ungoverned."""
    provider = getattr(spec, "provider", None)
    base_url = _normal(base_url)
    provider_level = _level(provider, cfg.limits.get(base_url) if cfg.limits else None)
    model_level = _level(spec, cfg.limits.get(model_name) if cfg.limits else None)
    if provider_level is None and model_level is None:
        return None
    scopes: list[Scope] = []
    if provider_level is not None:
        scopes += _scopes(f"p:{base_url}", provider_level, blackboard, cfg)
    model_scopes = _scopes(f"m:{base_url}|{model_name}", model_level or {}, blackboard, cfg)
    scopes += model_scopes
    keyed = [scope for scope in scopes if "#" in scope.key]
    return Plan(tuple(scopes), pause=model_scopes[0], queue=keyed[-1] if keyed else model_scopes[0])


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
