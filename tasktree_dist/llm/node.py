"""The LLM leaf: one chat-completions call, then the requested tool calls, in order.

Clients come from `LLM._new_async_openai_client(**client_kwargs)` (tinytasktree's hook, also `LLMNode`): by
default the running loop's shared client for those settings, whose non-streaming calls go through llm.direct
(aiohttp + orjson, configured by the openai client) unless TASKTREE_LLM_TRANSPORT=openai or the call needs
openai-python itself; streams always use openai-python. A patched factory is honoured: every call then goes
through `create()` on the object it returns, which is closed afterwards (as tinytasktree does).

Provider failures (HTTP errors, timeouts, refused connections, cut streams, a missing key) make the node FAIL
with the status and message on its trace, so Retry and Selector fallback chains work. Tool failures never
crash the node: the error goes back to the model as that tool's result (llm.tools).

openai (up to a second to import) is imported in a thread on the first call, so that call does not stall the
event loop: the other tasks on the loop keep running while it loads.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ..core.callables import adapt, callable_name, positional_arity, resolve
from ..core.errors import TasktreeProgrammingError
from ..core.instruments import hooks as metrics
from ..core.redact import redact_url
from ..core.result import Result, Status
from ..core.trace import Tracer
from ..core.tuning import freeze_gc_once
from ..nodes.base import LeafNode
from . import routing
from .clients import shared_client
from .limiter import FlowError
from .tools import run_tool_call
from .types import BATCH_FALLBACKS, LLMModel, LLMRunRecord, Tool, ToolCall, message_text, token_cost

if TYPE_CHECKING:
    from ..core.context import Context

JSONDict = dict[str, Any]


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    value = getattr(obj, name, default)
    if value is default:
        extra = getattr(obj, "model_extra", None) or {}
        value = extra.get(name, default)
    return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def usage_tokens(usage: Any) -> dict[str, int]:
    prompt = _number(_field(usage, "prompt_tokens")) or _number(_field(usage, "input_tokens"))
    completion = _number(_field(usage, "completion_tokens")) or _number(_field(usage, "output_tokens"))
    total = _number(_field(usage, "total_tokens"))
    tokens = {}
    if prompt is not None:
        tokens["prompt"] = int(prompt)
    if completion is not None:
        tokens["completion"] = int(completion)
    if total is not None:
        tokens["total"] = int(total)
    elif prompt is not None and completion is not None:
        tokens["total"] = int(prompt + completion)
    return tokens


def provider_cost(response: Any, usage: Any) -> float | None:
    """Cost reported by the provider or gateway (OpenRouter's usage.cost, LiteLLM's response_cost...), from a
    response object or the plain dict the direct transport reads."""
    hidden = _field(response, "_hidden_params") or {}
    for value in (
        hidden.get("response_cost") if isinstance(hidden, dict) else None,
        _field(response, "response_cost"),
        _field(usage, "cost"),
        _field(usage, "response_cost"),
        _field(usage, "estimated_cost"),
    ):
        number = _number(value)
        if number is not None:
            return number
    return None


_COPY_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def json_copy(value: Any) -> Any:
    """A private deep copy as JSON data, objects JSON lacks as their str(): json.loads(json.dumps(value,
    default=str)) at a fraction of the CPU (orjson; the json module for what orjson refuses, e.g. huge ints)."""
    try:
        return orjson.loads(orjson.dumps(value, default=str, option=_COPY_OPTIONS))
    except TypeError:
        return json.loads(json.dumps(value, default=str))


_transport: ModuleType | None = None


def _import_transport() -> ModuleType:
    """llm.direct, flow control and what they import; then the long-lived objects are frozen (core.tuning)."""
    transport = importlib.import_module(f"{__package__}.direct")
    importlib.import_module(f"{__package__}.flow")
    freeze_gc_once()
    return transport


async def load_transport() -> ModuleType:
    """llm.direct, and openai and aiohttp with it, imported in a thread the first time (see the module docstring)."""
    global _transport
    if _transport is None:
        _transport = await asyncio.get_running_loop().run_in_executor(None, _import_transport)
    return _transport


async def close_client(client: Any) -> None:
    """Close a client a patched factory made for one call (its close() may be sync or async, or missing)."""
    close = getattr(client, "close", None)
    if callable(close):
        closed = close()
        if inspect.isawaitable(closed):
            await closed


def _merged(*dicts: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        out.update(d or {})
    return out


@dataclass(slots=True)
class _Call:
    """What one LLM step sends, whichever deployment serves it."""

    input_messages: list[JSONDict]
    stream: bool
    tools: list[Tool[Any]] | None
    tools_by_name: dict[str, Tool[Any]]


#: (output, finish_reason, tool calls, usage, provider cost), the gate, when it started, the model name and spec.
_Sent = tuple[tuple[str, str, list[ToolCall], Any, float | None], Any, float, str, LLMModel | None]


class _Failed(Exception):
    """A send failed with a provider, flow-control or budget error (`error`); `gate` still holds its share."""

    def __init__(self, error: BaseException, gate: Any, started: float) -> None:
        super().__init__(str(error))
        self.error, self.gate, self.started = error, gate, started


class LLM(LeafNode):
    """Calls an OpenAI-compatible chat model; returns OK(LLMRunRecord)."""

    KIND: ClassVar[str] = "LLM"
    SHIPPABLE: ClassVar[bool] = True
    #: The one client factory, called with the merged client_kwargs plus base_url and api_key when given.
    #: Patch it (tinytasktree's hook) to hand the node any object with `chat.completions.create()`.
    _new_async_openai_client = staticmethod(shared_client)

    def __init__(
        self,
        model: str | LLMModel | Callable[[Any], str | LLMModel],
        messages: list[JSONDict] | Callable[[Any], list[JSONDict]],
        stream: bool | Callable[[Any], bool] = False,
        stream_on_delta: Callable[..., Any] | None = None,
        api_key: str | Callable[..., str | None] | None = None,
        name: str = "",
        base_url: str | Callable[[Any], str | None] | None = None,
        client_kwargs: JSONDict | None = None,
        extra_body: JSONDict | None = None,
        tools: list[Tool[Any]] | Callable[[Any], list[Tool[Any]]] | None = None,
        on_llm_message: Callable[[Any, JSONDict, Tracer], Any] | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        batch: bool | Callable[[Any], bool] | None = None,
        batch_fallback: str | None = None,
        **llm_call_kwargs: Any,
    ) -> None:
        super().__init__(name)
        what = self.fullname
        self.model, self.messages = model, messages
        self._model = adapt(model, (0, 1), f"{what} model") if callable(model) else None
        self._messages = adapt(messages, (0, 1), f"{what} messages") if callable(messages) else None
        self.stream = stream
        self._stream = adapt(stream, (0, 1), f"{what} stream") if callable(stream) else None
        self._on_delta = None
        if stream_on_delta is not None:
            arity = positional_arity(stream_on_delta)
            if arity not in (None, 4, 5):
                raise TasktreeProgrammingError(f"{what}: stream callback params count invalid (takes 4 or 5)")
            self._on_delta = stream_on_delta if arity in (None, 5) else (
                lambda b, full, delta, done, _reason, f=stream_on_delta: f(b, full, delta, done)
            )
        self.api_key = api_key
        self._api_key = adapt(api_key, (1, 2), f"{what} api_key factory") if callable(api_key) else None
        self.base_url = base_url
        self._base_url = adapt(base_url, (1,), f"{what} base_url factory") if callable(base_url) else None
        self.client_kwargs = dict(client_kwargs or {})
        if max_retries is not None:
            self.client_kwargs["max_retries"] = max_retries
        if timeout is not None:
            self.client_kwargs["timeout"] = timeout
        self.extra_body = dict(extra_body or {})
        self.tools = tools
        self._tools = adapt(tools, (0, 1), f"{what} tools factory") if callable(tools) else None
        if isinstance(tools, list):
            self._check_tools(tools)
        self._on_message = adapt(on_llm_message, (3,), f"{what} llm message callback") if on_llm_message else None
        self.llm_call_kwargs = llm_call_kwargs
        self.batch = batch  # None: the LLMModel's
        self._batch = adapt(batch, (0, 1), f"{what} batch") if callable(batch) else None
        if batch_fallback is not None and batch_fallback not in BATCH_FALLBACKS:
            raise TasktreeProgrammingError(f"{what}: batch_fallback must be one of {BATCH_FALLBACKS}, got "
                                           f"{batch_fallback!r}")
        self.batch_fallback = batch_fallback

    def _check_tools(self, tools: list[Tool[Any]]) -> dict[str, Tool[Any]]:
        by_name: dict[str, Tool[Any]] = {}
        for tool in tools:
            tool_name = getattr(tool, "NAME", "")
            if not tool_name or not isinstance(tool_name, str):
                raise TasktreeProgrammingError(f"{self.fullname}: tool {tool!r} has no NAME")
            if tool_name in by_name:
                raise TasktreeProgrammingError(f"{self.fullname}: two tools are named {tool_name!r}")
            by_name[tool_name] = tool
        return by_name

    def static_params(self) -> dict[str, Any]:
        model = self.model if isinstance(self.model, str) else getattr(self.model, "model", callable_name(self.model))
        params = {"model": model, "stream": self.stream if isinstance(self.stream, bool) else "<factory>"}
        if self.batch is not None:
            params["batch"] = self.batch if isinstance(self.batch, bool) else "<factory>"
        return params

    # -- request assembly -------------------------------------------------------------------------------------
    async def _resolve_model(self, b: Any) -> tuple[str, LLMModel | None]:
        model = await resolve(self._model(b)) if self._model is not None else self.model
        if isinstance(model, LLMModel):
            return model.model, model
        if isinstance(model, str) and model:
            return model, None
        raise ValueError(f"model must be a non-empty string or an LLMModel, got {model!r}")

    async def _api_key_for(self, b: Any, model_name: str, spec: LLMModel | None) -> str | None:
        if self._api_key is not None:
            key = await resolve(self._api_key(b, model_name))
        else:
            key = self.api_key
        if key is None and spec is not None and spec.provider is not None:
            key = spec.provider.api_key
        return key

    async def _base_url_for(self, b: Any, spec: LLMModel | None) -> str | None:
        url = await resolve(self._base_url(b)) if self._base_url is not None else self.base_url
        if not url and spec is not None and spec.provider is not None:
            url = spec.provider.base_url
        return url or None

    # -- execution --------------------------------------------------------------------------------------------
    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        transport = _transport or await load_transport()
        b = context.blackboard
        model_name, spec = await self._resolve_model(b)
        raw_messages = await resolve(self._messages(b)) if self._messages is not None else self.messages
        stream = bool(await resolve(self._stream(b))) if self._stream is not None else bool(self.stream)
        tools = (await resolve(self._tools(b))) if self._tools is not None else self.tools
        call = _Call(json_copy(raw_messages), stream, tools, self._check_tools(list(tools)) if tools else {})
        routed = routing.route_for(model_name, spec)
        sent: _Sent | Result | None = None
        if await self._wants_batch(b, spec):
            sent = await self._send_batch(context, tracer, call, model_name, spec, routed is not None)
        if sent is None and routed is not None:
            sent = await self._send_routed(context, tracer, transport, call, routed)
        elif sent is None:
            api_key = await self._api_key_for(b, model_name, spec)
            base_url = await self._base_url_for(b, spec)
            try:
                sent = await self._send(context, tracer, transport, call, model_name, spec, base_url, api_key)
            except _Failed as failed:
                return self._failed(tracer, failed, model_name)
        if isinstance(sent, Result):
            return sent
        (output, finish_reason, calls, usage, cost), gate, started, model_name, spec = sent
        input_messages, tools_by_name = call.input_messages, call.tools_by_name
        tracer.update_attributes(latency_ms=round((time.perf_counter() - started) * 1000, 1))

        tokens = usage_tokens(usage)
        if cost is None and spec is not None and tokens:
            priced = token_cost(spec, tokens.get("prompt", 0), tokens.get("completion", 0))
            cost = priced if priced > 0 else None
        metrics.llm_call(model_name, time.perf_counter() - started, tokens, cost)
        if cost:
            tracer.incr_cost(cost)
        if tokens:
            tracer.incr_tokens(tokens.get("prompt", 0), tokens.get("completion", 0))
            tracer.update_attributes(**{f"{kind}_tokens": count for kind, count in tokens.items()})
        if gate is not None:
            gate.settle(tokens, cost)  # the real usage corrects the reservation (flow control)
        tracer.update_attributes(output=output, finish_reason=finish_reason)

        record = LLMRunRecord(
            input_messages=input_messages,
            messages=list(input_messages),
            final_output=output,
            finish_reason=finish_reason,
            tool_calls=calls,
            model=model_name,
            usage=tokens,
            cost=cost or 0.0,
        )
        if output or calls:
            assistant: JSONDict = {"role": "assistant", "content": output or None}
            if calls:
                assistant["tool_calls"] = [call.to_dict() for call in calls]
            await self._emit(record, assistant, b, tracer)
        for tool_call in calls:
            tool_result, message = await run_tool_call(tool_call, tools_by_name, b, context, tracer)
            record.tool_results.append(tool_result)
            await self._emit(record, message, b, tracer)
        if calls:
            executions = [r.json() for r in record.tool_results]
            tracer.update_attributes(
                tool_calls=[c.to_dict() for c in calls], tool_results=executions, tool_executions=executions
            )
        tracer.update_attributes(chat_transcript=record.messages, emitted_messages=list(record.emitted_messages))
        return Result(Status.OK, record)

    async def _send_routed(
        self, context: Context, tracer: Tracer, transport: ModuleType, call: _Call, model: LLMModel
    ) -> _Sent | Result:
        """The call sent to the model's deployments, then its fallbacks, as llm.routing orders them."""
        from ..core.settings import get_settings  # pydantic-settings: on first use

        b = context.blackboard
        settings = get_settings()
        timeout = _merged(self.client_kwargs, model.client_kwargs).get("timeout")
        wait_s = settings.llm_route_wait_s
        if isinstance(timeout, int | float) and not isinstance(timeout, bool):
            wait_s = min(wait_s, float(timeout))
        route = routing.Route(model, await self._base_url_for(b, None), getattr(context.executor, "redis_url", None),
                              b, wait_s)
        node_key = await self._api_key_for(b, model.model, None)
        while True:
            try:
                target = await route.next()
            except (routing.RouteExhausted, FlowError) as exc:
                tracer.update_attributes(error=str(exc), error_type=type(exc).__name__, llm_route=route.moves)
                tracer.log(f"LLM call to {model.model!r} failed: {exc}", "error")
                return Result(Status.FAIL, None)
            provider = target.provider
            api_key = (provider.api_key if provider is not None else None) or node_key
            tracer.update_attributes(deployment=target.label, route_tier=target.tier)
            try:
                sent = await self._send(context, tracer, transport, call, target.model, target,
                                        route.base_url(target), api_key, route.attempts)
            except _Failed as failed:
                what = route.failed(target, failed.error)
                tracer.update_attributes(llm_route=route.moves)
                if what in ("fail", "context") and (what == "fail" or not route.tiers):
                    return self._failed(tracer, failed, target.model)
                metrics.llm_call(target.model, time.perf_counter() - failed.started, error=failed.error)
                if failed.gate is not None:
                    failed.gate.abandon()
                tracer.log(f"deployment {target.label} ({target.tier}): {type(failed.error).__name__}: "
                           f"{failed.error}; {'moving on' if what != 'context' else 'context-window fallback'}",
                           "warning")
                continue
            if route.moves:
                tracer.update_attributes(llm_route=route.moves)
            return sent

    async def _send(
        self, context: Context, tracer: Tracer, transport: ModuleType, call: _Call, model_name: str,
        spec: LLMModel | None, base_url: str | None, api_key: str | None,
        attempts: list[JSONDict] | None = None,
    ) -> _Sent:
        """One chat-completions call to `model_name` (through its flow-control gate); raises _Failed."""
        from . import flow as llm_flow  # flow control (llm/flow.py); openai is imported by now

        client_kwargs, request = self._request(tracer, call, model_name, spec, base_url, api_key)
        stream = call.stream
        if base_url is not None:
            client_kwargs["base_url"] = base_url
        if api_key is not None:
            client_kwargs["api_key"] = api_key

        gate: llm_flow.Gate | None = None  # flow control (llm/flow.py): None when no limit or budget applies
        started = time.perf_counter()
        factory = self._new_async_openai_client
        shared = factory is shared_client
        try:
            client = factory(**client_kwargs)
            try:
                direct = transport.prepare(client, request) if shared else None
                tracer.update_attributes(transport="openai" if direct is None else "direct")
                gate = llm_flow.gate(context, tracer, client, model_name, spec, request, direct, attempts)
                if gate is not None:
                    response = await gate.send(client, direct, request)
                elif direct is None:
                    response = await client.chat.completions.create(**request)
                else:
                    response = await direct.send()
                if stream:
                    answer = await self._read_stream(response, context.blackboard)
                else:
                    answer = self._read_response(response)
            finally:
                if not shared:
                    await close_client(client)
        except (*transport.PROVIDER_ERRORS, llm_flow.FlowError, llm_flow.BudgetExceeded) as exc:
            raise _Failed(exc, gate, started) from exc
        except BaseException:
            if gate is not None:
                gate.abandon()  # cancelled: free its slots now
            raise
        return answer, gate, started, model_name, spec

    def _request(
        self, tracer: Tracer, call: _Call, model_name: str, spec: LLMModel | None, base_url: str | None,
        api_key: str | None,
    ) -> tuple[JSONDict, JSONDict]:
        """(client kwargs, the chat-completions request) of a call to `model_name`, its attributes on the trace."""
        provider = spec.provider if spec is not None else None
        input_messages, stream, tools, tools_by_name = call.input_messages, call.stream, call.tools, call.tools_by_name
        layers = (self,) if spec is None else (provider, spec, self) if provider is not None else (spec, self)
        client_kwargs, extra_body, call_kwargs = (
            _merged(*(getattr(layer, attr, None) for layer in layers))
            for attr in ("client_kwargs", "extra_body", "llm_call_kwargs")
        )

        request: JSONDict = {**call_kwargs, "model": model_name, "messages": input_messages, "stream": stream}
        if extra_body:
            request["extra_body"] = extra_body
        if tools is not None:  # an empty list too, as tinytasktree: the factory said "no tools this time"
            request["tools"] = [tool.openai_schema() for tool in tools_by_name.values()]
        if stream and "stream_options" not in request:
            request["stream_options"] = {"include_usage": True}
        tracer.update_attributes(
            model=model_name, base_url=redact_url(base_url) if base_url else "(client default)", stream=stream,
            messages_count=len(input_messages), tools=sorted(tools_by_name), **({"api_key": "***"} if api_key else {}),
            **({"extra_body": extra_body} if extra_body else {}),
            **({"reasoning": extra_body["reasoning"]} if "reasoning" in extra_body else {}),
            input_price_per_m=spec.input_price_per_m if spec is not None else 0.0,
            output_price_per_m=spec.output_price_per_m if spec is not None else 0.0,
            **{k: v for k, v in call_kwargs.items() if isinstance(v, str | int | float | bool)},
        )
        return client_kwargs, request

    # -- batch mode (llm/batch.py) ----------------------------------------------------------------------------
    async def _wants_batch(self, b: Any, spec: LLMModel | None) -> bool:
        if self._batch is not None:
            return bool(await resolve(self._batch(b)))
        if self.batch is not None:
            return bool(self.batch)
        wanted = getattr(spec, "batch", False)
        if callable(wanted):
            return bool(await resolve(adapt(wanted, (0, 1), f"{self.fullname} LLMModel.batch")(b)))
        return bool(wanted)

    async def _send_batch(
        self, context: Context, tracer: Tracer, call: _Call, model_name: str, spec: LLMModel | None, routed: bool,
    ) -> _Sent | Result | None:
        """The call through the provider's Batch API; None: send it live instead (a stream, an in-process run, a
        routed model, or what its batch did not answer when batch_fallback is "live"). In a worker's unit the call
        parks (llm.batch_park): added to its batch, the unit ends awaiting it, and its continuation (the unit sent
        again once the batch is read) finds the outcome recorded here. Elsewhere it waits in place."""
        from ..core.settings import get_settings  # pydantic-settings: on first use
        from . import flow as llm_flow
        from .batch import BatchError, BatchOutcome, get_batch_queue
        from .batch_park import BatchPending, parking

        why_live = ("a streaming call" if call.stream else "an in-process run (no fleet)" if context.run_id is None
                    else "a model with deployments or fallbacks" if routed else None)
        if why_live is not None:
            tracer.update_attributes(batch="live", batch_live_reason=f"batch mode: {why_live} goes live")
            return None
        b = context.blackboard
        api_key = await self._api_key_for(b, model_name, spec)
        base_url = await self._base_url_for(b, spec) or "https://api.openai.com/v1"
        _, request = self._request(tracer, call, model_name, spec, base_url, api_key)
        body = {k: v for k, v in request.items() if k not in ("extra_body", "extra_headers", "extra_query", "timeout")}
        body.update(request.get("extra_body") or {})
        body.pop("stream", None)
        settings = get_settings()
        fallback = self.batch_fallback or getattr(spec, "batch_fallback", "live")
        started = time.perf_counter()
        queue = get_batch_queue(getattr(context.executor, "redis_url", None) or settings.redis_url)
        unit = parking()
        custom_id = self._batch_custom_id(context, tracer)
        gate = llm_flow.batch_gate(context, tracer, spec, body)
        try:
            outcome = await queue.outcome(custom_id) if custom_id is not None else None
            if outcome is None and unit is not None and custom_id in unit.awaited:
                outcome = BatchOutcome(custom_id, False, error="its batch wait ended (TASKTREE_LLM_BATCH_TTL_S) "
                                                               "without an answer")
            if outcome is None:
                if gate is not None:
                    await gate.commit()  # the run's budget counts it now, at the batch price
                custom_id = await queue.add(base_url, api_key, model_name, body, custom_id, context.run_id or "")
                tracer.update_attributes(batch="queued", batch_custom_id=custom_id)
                if unit is not None and custom_id is not None:
                    unit.pending.append(custom_id)
                    tracer.update_attributes(batch="parked")
                    raise BatchPending(unit.pending)
                async with asyncio.timeout(settings.llm_batch_ttl_s):
                    outcome = await queue.wait(custom_id)  # outside a unit: no run to park
        except BatchError as exc:
            outcome_error = str(exc)
        except llm_flow.BudgetExceeded as exc:
            assert gate is not None
            return gate.failed(exc, self._provider_failure(tracer, exc, model_name))
        else:
            tracer.update_attributes(batch_custom_id=custom_id, batch_id=outcome.batch_id)
            try:
                answer = self._read_response(outcome.body) if outcome.ok and outcome.body is not None else None
            except ValueError as exc:  # an answer that is no chat completion: as if the batch had not answered
                answer, outcome = None, replace(outcome, error=f"batch {outcome.batch_id}: {exc}")
            if answer is not None:
                output, finish_reason, calls, usage, cost = answer
                tokens = usage_tokens(usage)
                if cost is None and spec is not None and tokens:
                    factor = spec.batch_price_factor
                    priced = token_cost(spec, tokens.get("prompt", 0), tokens.get("completion", 0), factor)
                    cost = priced if priced > 0 else None
                    tracer.update_attributes(batch_price_factor=factor)
                if gate is not None:
                    await gate.correct(tokens, cost)
                tracer.update_attributes(batch="answered")
                return (output, finish_reason, calls, usage, cost), None, started, model_name, spec
            outcome_error = outcome.error or "no outcome"
        if gate is not None:
            await gate.correct({"total": 0}, 0.0)  # not run in a batch: not paid there (a live call counts itself)
        tracer.update_attributes(batch="fallback" if fallback == "live" else "failed", batch_error=outcome_error)
        if fallback == "live":
            tracer.log(f"batch mode: {outcome_error}; sending the call live", "warning")
            return None
        tracer.update_attributes(error=f"BatchError: {outcome_error}", error_type="BatchError")
        tracer.log(f"LLM call to {model_name!r} failed in its batch: {outcome_error}", "error")
        return Result(Status.FAIL, None)

    @staticmethod
    def _batch_custom_id(context: Context, tracer: Tracer) -> str | None:
        """The same id each time a unit runs this call (a re-dispatch after its worker died, the continuation after
        its batch was read): the unit's execution id (a continuation's is its first's) and the call's trace position
        (deterministic for the unit's control flow). Its batch answers it once; nobody pays twice. None outside a
        shipped unit (a fresh id then)."""
        if context.unit_id is None:
            return None
        digest = hashlib.blake2b(f"{context.unit_id}|{tracer.position()}".encode(), digest_size=16)
        return f"tt-{digest.hexdigest()}"

    def _failed(self, tracer: Tracer, failed: _Failed, model_name: str) -> Result:
        metrics.llm_call(model_name, time.perf_counter() - failed.started, error=failed.error)
        failure = self._provider_failure(tracer, failed.error, model_name)
        return failure if failed.gate is None else failed.gate.failed(failed.error, failure)

    def _provider_failure(self, tracer: Tracer, exc: BaseException, model_name: str) -> Result:
        status = getattr(exc, "status_code", None)
        kind = type(exc).__name__
        detail = str(exc) or kind
        cause = exc.__cause__ or exc.__context__
        if status is None and cause is not None and str(cause) and str(cause) not in detail:
            # openai's "Connection error." alone cannot tell a refused connection from a cut stream
            detail += f" ({type(cause).__name__}: {cause})"
        tracer.update_attributes(error=f"{kind}: {detail}", error_type=kind, model=model_name)
        if status is not None:
            tracer.update_attributes(status_code=status)
        http = f" (HTTP {status})" if status else ""
        tracer.log(f"LLM call to {model_name!r} failed: {kind}{http}: {detail}", "error")
        return Result(Status.FAIL, None)

    def _read_response(self, response: Any) -> tuple[str, str, list[ToolCall], Any, float | None]:
        choices = _field(response, "choices") or []
        if not choices:
            raise ValueError(f"response has no choices: {str(response)[:200]}")
        choice = choices[0]
        message = _field(choice, "message")
        calls = [
            ToolCall.from_dict(call.model_dump() if hasattr(call, "model_dump") else call)
            for call in (_field(message, "tool_calls") or [])
        ]
        usage = _field(response, "usage")
        return (
            message_text(_field(message, "content")), str(_field(choice, "finish_reason") or ""), calls, usage,
            provider_cost(response, usage),
        )

    async def _read_stream(self, stream: Any, b: Any) -> tuple[str, str, list[ToolCall], Any, float | None]:
        parts: list[str] = []
        finish_reason = ""
        usage: Any = None
        cost: float | None = None
        calls: dict[int, ToolCall] = {}
        async for chunk in stream:
            chunk_usage = _field(chunk, "usage")
            if chunk_usage:
                usage = chunk_usage
                cost = provider_cost(chunk, chunk_usage) if cost is None else cost
            for choice in _field(chunk, "choices") or []:
                delta = _field(choice, "delta")
                text = message_text(_field(delta, "content"))
                finish_reason = str(_field(choice, "finish_reason") or finish_reason or "")
                for fragment in _field(delta, "tool_calls") or []:
                    self._merge_tool_delta(calls, fragment)
                if text:
                    parts.append(text)
                if self._on_delta is not None and (text or _field(choice, "finish_reason")):
                    await resolve(self._on_delta(b, "".join(parts), text, False, finish_reason))
        if not finish_reason:
            raise ValueError("the stream ended before the model finished (no finish_reason): connection cut?")
        output = "".join(parts)
        if self._on_delta is not None:
            await resolve(self._on_delta(b, output, "", True, finish_reason))
        return output, finish_reason, [calls[i] for i in sorted(calls)], usage, cost

    @staticmethod
    def _merge_tool_delta(calls: dict[int, ToolCall], fragment: Any) -> None:
        index = _field(fragment, "index")
        index = len(calls) if index is None else int(index)
        call = calls.get(index)
        if call is None:
            call = calls[index] = ToolCall(index=index)
        if _field(fragment, "id"):
            call.id = _field(fragment, "id")
        if _field(fragment, "type"):
            call.type = _field(fragment, "type")
        function = _field(fragment, "function")
        if function is not None:
            if _field(function, "name"):
                call.function.name += _field(function, "name")
            if _field(function, "arguments"):
                call.function.arguments += _field(function, "arguments")

    async def _emit(self, record: LLMRunRecord, message: JSONDict, b: Any, tracer: Tracer) -> None:
        record.messages.append(message)
        record.emitted_messages.append(message)
        if self._on_message is not None:
            await resolve(self._on_message(b, message, tracer))


#: tinytasktree's name for the LLM node class (tests and users patch `LLMNode._new_async_openai_client`).
LLMNode = LLM
