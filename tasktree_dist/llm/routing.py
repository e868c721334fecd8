"""Deployments and fallbacks: which provider serves an LLM call, and where the call goes when one fails.

A model with deployments (`LLMModel(name, deployments=[LLMDeployment(provider, ...)])`, or a model name in
TASKTREE_LLM_DEPLOYMENTS) is served by the deployment with the most spare capacity under its fleet-wide limits,
read from the counters flow control keeps in Redis (one script call looks at every deployment); weights break
ties. Why spare capacity rather than round robin: every process of the fleet sees the same counters, so a
deployment another worker is filling is avoided here too.

A deployment that fails a call after its retries (429, 5xx, a timeout, a connection error) cools down fleet-wide:
its model scope is paused (the pause of flow control) for TASKTREE_LLM_COOLDOWN_S, so no process sends it calls
meanwhile, and the call moves to the next deployment, then to the model's `fallbacks` in order. A context-length
error goes to `context_window_fallbacks`. Every deployment is governed by flow control (its pause is its
cooldown), so routing needs the fleet's Redis, as limits do. Every attempt is in the trace's `llm_attempts` with
its deployment; cost is priced with the deployment's prices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from . import limits
from .limiter import Cooling, KeyIndex, Limiter, get_limiter
from .types import LLMDeployment, LLMModel, LLMProvider

#: Deployments whose spare capacity is within this share of the best one's count as equally free (weights decide).
TIE = 0.02
#: Most targets one call tries (a deployment may be picked again after a cooldown ends).
MAX_MOVES = 32
_CONTEXT_ERROR = re.compile(
    r"context.length|context.window|maximum context|too many tokens|prompt is too long|reduce the length", re.I
)


class RouteExhausted(Exception):
    """No deployment or fallback is left for the call: each failed, or all cool down past the call's wait."""


@dataclass(frozen=True)
class RoutedModel(LLMModel):
    """One deployment (or fallback model) as the LLM node calls it. Always governed by flow control: its pause is
    its cooldown, seen by every process."""

    label: str = ""
    tier: str = "primary"
    weight: float = 1.0
    always_governed: ClassVar[bool] = True  # limits.plan: a scope (its pause) even without limits


def _label(provider: LLMProvider | None, model_name: str) -> str:
    return f"{provider.base_url.rstrip('/')}|{model_name}" if provider is not None else model_name


def targets(model: LLMModel, tier: str) -> list[RoutedModel]:
    """`model`'s deployments as models the node can call (the model itself when it has none)."""
    own_limits = {name: getattr(model, name) for name in (*limits.LIMIT_FIELDS, "concurrency_key")}
    common = {"extra_body": model.extra_body, "client_kwargs": model.client_kwargs,
              "llm_call_kwargs": model.llm_call_kwargs, "tier": tier}
    if not model.deployments:
        return [RoutedModel(model.model, model.provider, input_price_per_m=model.input_price_per_m,
                            output_price_per_m=model.output_price_per_m, label=_label(model.provider, model.model),
                            **own_limits, **common)]
    out = []
    for deployment in model.deployments:
        name = deployment.model_name or model.model
        chosen = {key: getattr(deployment, key) if getattr(deployment, key) is not None else value
                  for key, value in own_limits.items()}
        out.append(RoutedModel(
            name, deployment.provider,
            input_price_per_m=_first(deployment.input_price_per_m, model.input_price_per_m),
            output_price_per_m=_first(deployment.output_price_per_m, model.output_price_per_m),
            label=_label(deployment.provider, name), weight=deployment.weight, **chosen, **common,
        ))
    return out


def _first(value: float | None, default: float) -> float:
    return default if value is None else value


# -- the settings' form --------------------------------------------------------------------------------------------
_DEPLOYMENT_KEYS = {"base_url", "api_key", "api_key_env", "model_name", "weight", *limits.LIMIT_FIELDS,
                    "input_price_per_m", "output_price_per_m"}
_MODEL_KEYS = {"deployments", "fallbacks", "context_window_fallbacks", "input_price_per_m", "output_price_per_m"}
_from_settings: dict[int, tuple[Any, dict[str, LLMModel]]] = {}


def settings_model(name: str, settings: Any = None) -> LLMModel | None:
    """The model TASKTREE_LLM_DEPLOYMENTS declares under `name`, or None."""
    if settings is None:
        from ..core.settings import get_settings

        settings = get_settings()
    table = settings.llm_deployments
    if not table or name not in table:
        return None
    cached = _from_settings.get(id(settings))
    if cached is None or cached[0] is not table:
        cached = _from_settings[id(settings)] = (table, models_from_settings(table))
    return cached[1][name]


def models_from_settings(table: Mapping[str, Any]) -> dict[str, LLMModel]:
    """TASKTREE_LLM_DEPLOYMENTS as LLMModels (fallbacks by name: another entry, or a plain model of that name
    served where the node's base_url points). Errors name the entry and the field."""
    plain: dict[str, LLMModel] = {}
    for name, entry in table.items():
        where = f"TASKTREE_LLM_DEPLOYMENTS[{name!r}]"
        if not isinstance(entry, Mapping) or set(entry) - _MODEL_KEYS:
            raise ValueError(f"{where}: expected an object with {sorted(_MODEL_KEYS)}, got {entry!r}")
        deployments = [_deployment(f"{where}.deployments[{n}]", item)
                       for n, item in enumerate(entry.get("deployments") or [])]
        plain[name] = LLMModel(name, deployments=deployments, input_price_per_m=entry.get("input_price_per_m", 0.0),
                               output_price_per_m=entry.get("output_price_per_m", 0.0))
    out = {}
    for name, model in plain.items():
        entry = table[name]
        chains = {}
        for key in ("fallbacks", "context_window_fallbacks"):
            names = entry.get(key) or []
            if not isinstance(names, list) or not all(isinstance(other, str) for other in names):
                raise ValueError(f"TASKTREE_LLM_DEPLOYMENTS[{name!r}].{key}: expected a list of model names")
            chains[key] = [plain.get(other) or LLMModel(other) for other in names]
        out[name] = dataclasses.replace(model, **chains)
    return out


def _deployment(where: str, item: Any) -> LLMDeployment:
    if not isinstance(item, Mapping) or "base_url" not in item or set(item) - _DEPLOYMENT_KEYS:
        raise ValueError(f"{where}: expected an object with base_url and any of {sorted(_DEPLOYMENT_KEYS)}, got "
                         f"{item!r}")
    key = item.get("api_key")
    if "api_key_env" in item:
        key = os.environ.get(item["api_key_env"])
        if key is None:
            raise ValueError(f"{where}: the environment variable {item['api_key_env']!r} (api_key_env) is not set")
    options = {k: item[k] for k in (*limits.LIMIT_FIELDS, "model_name", "weight", "input_price_per_m",
                                    "output_price_per_m") if k in item}
    try:
        return LLMDeployment(LLMProvider(item["base_url"], key), **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


# -- failures ------------------------------------------------------------------------------------------------------
def verdict(exc: BaseException) -> str:
    """What a failed call means for routing: "cooling" (the deployment paused meanwhile), "move" (cool it down,
    try the next), "context" (the prompt is too long: context-window fallbacks) or "fail" (the request itself)."""
    import openai

    if isinstance(exc, Cooling):
        return "cooling"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status in (400, 413, 422) and is_context_error(exc):
            return "context"
        return "move" if status in (408, 409, 429) or status >= 500 else "fail"
    if isinstance(exc, openai.APIConnectionError | ConnectionError | TimeoutError):
        return "move"
    return "fail"


def is_context_error(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    return code == "context_length_exceeded" or bool(_CONTEXT_ERROR.search(str(exc)))


# -- one call's route ----------------------------------------------------------------------------------------------
class Route:
    """The targets one call may use, in order: the model's deployments (best spare capacity first), then each
    fallback's; after a context-length error, the context-window fallbacks'. Keeps the call's attempts."""

    def __init__(self, model: LLMModel, node_base_url: str | None, redis_url: str | None, blackboard: Any,
                 wait_s: float) -> None:
        self.model = model
        self.node_base_url = node_base_url
        self.cfg = limits.config()
        self.redis_url = redis_url or self.cfg.redis_url
        self.blackboard = blackboard
        self.wait_s = wait_s
        self.tiers = [targets(model, "primary"), *(targets(f, f"fallback {f.model}") for f in model.fallbacks)]
        self.tried: set[str] = set()
        self.attempts: list[dict[str, Any]] = []  # the gates' attempts, each with its deployment
        self.moves: list[dict[str, Any]] = []
        self._plans: dict[str, limits.Plan] = {}
        self.in_context = False  # on the context-window fallbacks: another context error moves to the next one

    def base_url(self, target: RoutedModel) -> str | None:
        return target.provider.base_url if target.provider is not None else self.node_base_url

    def _plan(self, target: RoutedModel) -> limits.Plan:
        plan = self._plans.get(target.label)
        if plan is None:
            base_url = self.base_url(target) or "https://api.openai.com/v1"  # openai-python's default
            plan = limits.plan(target.model, target, base_url, self.blackboard, self.cfg)
            assert plan is not None  # RoutedModel is always governed
            self._plans[target.label] = plan
        return plan

    @property
    def limiter(self) -> Limiter:
        return get_limiter(self.redis_url, self.cfg.lease_s)

    async def look(self, candidates: Sequence[RoutedModel]) -> list[tuple[float, float]]:
        """(spare capacity 0..1, ms left cooling) of each candidate, from its scopes' counters in Redis."""
        plans = [self._plan(target) for target in candidates]

        def build(index: KeyIndex) -> dict[str, Any]:
            return {"o": "i", "s": [[index.scope(scope.key), scope.window_ms] for plan in plans
                                    for scope in plan.scopes]}

        answer = iter(await self.limiter.call(build))
        out = []
        for plan in plans:
            cooling, shares = 0.0, []
            for scope in plan.scopes:
                paused, requests, tokens, slots, waiting = next(answer)
                cooling = max(cooling, paused)
                if scope.rpm:
                    shares.append((scope.rpm - requests - waiting) / scope.rpm)
                if scope.tpm:
                    shares.append((scope.tpm - tokens) / scope.tpm)
                if scope.concurrency:
                    shares.append((scope.concurrency - slots - waiting) / scope.concurrency)
            out.append((min(shares, default=1.0), cooling))
        return out

    async def next(self) -> RoutedModel:
        """The target to try now: the first tier with one ready (best spare capacity, ties by weight); when every
        one left is cooling down, the earliest after its cooldown, unless that is past the call's wait."""
        deadline = time.monotonic() + self.wait_s
        while True:
            left = [(n, t) for n, tier in enumerate(self.tiers) for t in tier if t.label not in self.tried]
            if not left or len(self.moves) >= MAX_MOVES:
                raise RouteExhausted(self._exhausted())
            states = await self.look([t for _, t in left])
            ready = [(n, t, spare) for (n, t), (spare, cooling) in zip(left, states, strict=True) if cooling <= 0]
            if ready:
                tier = min(n for n, _, _ in ready)
                return _pick([(t, spare) for n, t, spare in ready if n == tier])
            earliest = min(cooling for _, cooling in states) / 1000
            if time.monotonic() + earliest > deadline:
                cooling = ", ".join(f"{t.label} ({c / 1000:.1f} s)" for (_, t), (_, c) in zip(left, states,
                                                                                               strict=True))
                raise RouteExhausted(
                    f"every deployment left is cooling down past this call's wait of {self.wait_s:g} s: {cooling}"
                    + (f"; before: {self._exhausted()}" if self.moves else "")
                )
            await asyncio.sleep(earliest + random.uniform(0, min(0.5, earliest * 0.1)))

    def failed(self, target: RoutedModel, exc: BaseException) -> str:
        """A call to `target` failed with `exc`: cool it down when that is its fault; returns verdict(exc)."""
        what = verdict(exc)
        self.moves.append({"deployment": target.label, "tier": target.tier, "verdict": what,
                           "error": f"{type(exc).__name__}: {exc}"[:300]})
        if what == "cooling":
            return what
        self.tried.add(target.label)
        if what == "move":
            self.cool_down(target)
        elif what == "context" and not self.in_context:
            self.in_context = True
            self.tiers = [targets(f, f"context-window fallback {f.model}")
                          for f in self.model.context_window_fallbacks]
            self.tried = set()
        return what

    def cool_down(self, target: RoutedModel) -> None:
        """Pause `target`'s calls on the whole fleet for TASKTREE_LLM_COOLDOWN_S (at once, no answer awaited)."""
        from ..core.settings import get_settings

        seconds = get_settings().llm_cooldown_s
        key = self._plan(target).pause.key
        self.limiter.submit(
            lambda index: {"o": "p", "s": [index.scope(key)], "ms": seconds * 1000, "x": int(seconds * 1000) + 60_000},
            False,
        )

    def _exhausted(self) -> str:
        tried = "; ".join(f"{m['deployment']} ({m['tier']}): {m['error']}" for m in self.moves)
        return f"no deployment or fallback left for {self.model.model!r}" + (f"; tried {tried}" if tried else "")


def _pick(candidates: list[tuple[RoutedModel, float]]) -> RoutedModel:
    """The candidate with the most spare capacity; those within TIE of it are drawn by weight."""
    best = max(spare for _, spare in candidates)
    tied = [target for target, spare in candidates if spare >= best - TIE]
    if len(tied) == 1:
        return tied[0]
    return random.choices(tied, weights=[target.weight for target in tied])[0]


def route_for(model_name: str, spec: LLMModel | None) -> LLMModel | None:
    """The model whose deployments and fallbacks route this call, or None for a plain call."""
    if spec is not None:
        return spec if spec.routed and not isinstance(spec, RoutedModel) else None
    return settings_model(model_name)
