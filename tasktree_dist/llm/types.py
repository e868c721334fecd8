"""The LLM vocabulary: providers, models, tools and the record an LLM step returns.

Records are dataclasses registered with serde, so an LLM step's result keeps its type when it crosses a process
boundary (a worker's result, a cache entry).
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..core.serde import register_type
from ..core.trace import TraceNode
from .limits import FlowLimits

if TYPE_CHECKING:
    from ..core.context import Context

B = TypeVar("B")
JSONDict = dict[str, Any]
#: What a batch-mode call its batch did not answer does: go live, or FAIL.
BATCH_FALLBACKS = ("live", "fail")


@dataclass(frozen=True)
class LLMProvider(FlowLimits):
    """An OpenAI-compatible endpoint and the defaults every model on it shares; its keyword-only limits (rpm, tpm,
    window_s, concurrency, concurrency_key: see limits.FlowLimits) hold for all its models together."""

    base_url: str
    api_key: str | None = None
    client_kwargs: JSONDict = field(default_factory=dict)
    extra_body: JSONDict = field(default_factory=dict)
    llm_call_kwargs: JSONDict = field(default_factory=dict)


@dataclass(frozen=True)
class LLMModel(FlowLimits):
    """A model on a provider, with optional prices (USD per 1M tokens) used when the provider reports no cost, and
    keyword-only limits for this model (rpm, tpm, window_s, concurrency, concurrency_key: see limits.FlowLimits)."""

    model: str
    provider: LLMProvider | None = None
    extra_body: JSONDict = field(default_factory=dict)
    input_price_per_m: float = 0.0
    output_price_per_m: float = 0.0
    client_kwargs: JSONDict = field(default_factory=dict)
    llm_call_kwargs: JSONDict = field(default_factory=dict)
    #: Where the model is served: each call goes to the deployment with the most spare capacity (llm.routing).
    deployments: Sequence[LLMDeployment] = ()
    #: Models tried in order once every deployment failed (429, 5xx, timeout, connection error).
    fallbacks: Sequence[LLMModel] = ()
    #: Models tried in order when the prompt is too long for this one (a context-length error).
    context_window_fallbacks: Sequence[LLMModel] = ()
    #: Batch mode (llm.batch): in a distributed run, calls go to the provider's Batch API (`(b) -> bool` too).
    batch: bool | Callable[[Any], bool] = field(default=False, compare=False)
    #: What the prices are multiplied by for a call answered through the Batch API (unless the provider reports cost).
    batch_price_factor: float = 0.5
    #: A call its batch did not answer (errored, expired, failed, cancelled, no Batch API): "live" sends it live,
    #: "fail" FAILs the node.
    batch_fallback: str = "live"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("deployments", "fallbacks", "context_window_fallbacks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for deployment in self.deployments:
            if not isinstance(deployment, LLMDeployment):
                raise TypeError(f"LLMModel({self.model!r}).deployments: expected LLMDeployment, got {deployment!r}")
        if self.batch_fallback not in BATCH_FALLBACKS:
            raise ValueError(f"LLMModel({self.model!r}).batch_fallback must be one of {BATCH_FALLBACKS}, got "
                             f"{self.batch_fallback!r}")
        for name in ("fallbacks", "context_window_fallbacks"):
            for other in getattr(self, name):
                if not isinstance(other, LLMModel):
                    raise TypeError(f"LLMModel({self.model!r}).{name}: expected LLMModel, got {other!r}")

    @property
    def name(self) -> str:
        return self.model

    @property
    def routed(self) -> bool:
        """Calls of this model go through llm.routing (deployments or fallbacks to choose from)."""
        return bool(self.deployments or self.fallbacks or self.context_window_fallbacks)


@dataclass(frozen=True)
class LLMDeployment(FlowLimits):
    """One place a model is served: a provider and the model's name there (default: the LLMModel's), a weight that
    breaks ties between deployments with as much spare capacity, this deployment's own keyword-only limits (rpm,
    tpm, window_s, concurrency: fleet-wide, see limits.FlowLimits) and prices (default: the LLMModel's)."""

    provider: LLMProvider
    model_name: str | None = None
    weight: float = 1.0
    input_price_per_m: float | None = None
    output_price_per_m: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.provider, LLMProvider):
            raise TypeError(f"LLMDeployment.provider: expected LLMProvider, got {self.provider!r}")
        if isinstance(self.weight, bool) or not self.weight > 0:
            raise ValueError(f"LLMDeployment.weight must be a positive number, got {self.weight!r}")


@register_type
@dataclass
class ToolFunction:
    name: str = ""
    arguments: str = ""


@register_type
@dataclass
class ToolCall:
    id: str = ""
    type: str = "function"
    function: ToolFunction = field(default_factory=ToolFunction)
    index: int | None = None

    def to_dict(self) -> JSONDict:
        return {"id": self.id, "type": self.type, "function": dataclasses.asdict(self.function)}

    @classmethod
    def from_dict(cls, data: Any) -> ToolCall:
        if not isinstance(data, dict):
            return cls()
        function = data.get("function") or {}
        return cls(
            id=str(data.get("id") or ""),
            type=str(data.get("type") or "function"),
            function=ToolFunction(str(function.get("name") or ""), str(function.get("arguments") or "")),
            index=data.get("index"),
        )


@register_type
@dataclass
class ToolResult:
    id: str
    name: str
    arguments: Any  # the parsed JSON object ({} when the model sent unparseable arguments), as in tinytasktree
    result: Any = None
    ok: bool = True
    error: str | None = None
    duration_ms: float = 0.0

    def json(self) -> JSONDict:
        return dataclasses.asdict(self)


@register_type
@dataclass(slots=True)  # no per-instance dict: a 100,000-item batch holds 100,000 of them in its coordinator
class LLMRunRecord:
    """What one LLM step did: the conversation before and after, the tool calls and their results."""

    input_messages: list[JSONDict] = field(default_factory=list)
    emitted_messages: list[JSONDict] = field(default_factory=list)
    messages: list[JSONDict] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    final_output: str = ""
    finish_reason: str = ""
    model: str = ""
    usage: JSONDict = field(default_factory=dict)
    cost: float = 0.0

    def __post_init__(self) -> None:
        # `messages` is input_messages then emitted_messages, the same dicts (as the LLM node builds it); a record
        # decoded in another process gets them shared again: a 100,000-item batch's results hold each message once
        n = len(self.input_messages)
        if (len(self.messages) == n + len(self.emitted_messages) and self.messages[:n] == self.input_messages
                and self.messages[n:] == self.emitted_messages):
            self.messages = [*self.input_messages, *self.emitted_messages]

    def json(self) -> JSONDict:
        data = dataclasses.asdict(self)
        data["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return data

    def __str__(self) -> str:
        return self.final_output


class Tool(abc.ABC, Generic[B]):
    """A function the model may call. Subclasses set NAME, DESCRIPTION, SCHEMA and implement `execute`."""

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str] = ""
    SCHEMA: ClassVar[JSONDict] = {"type": "object", "properties": {}}
    SIGNATURES: ClassVar[Sequence[str]] = ()
    EXAMPLES: ClassVar[Sequence[str]] = ()

    def description(self) -> str:
        parts = [self.DESCRIPTION.strip()]
        if self.SIGNATURES:
            parts.append("Signatures:\n" + "\n".join(self.SIGNATURES))
        if self.EXAMPLES:
            parts.append("Examples:\n" + "\n".join(self.EXAMPLES))
        return "\n\n".join(part for part in parts if part)

    def openai_schema(self) -> JSONDict:
        return {
            "type": "function",
            "function": {"name": self.NAME, "description": self.description(), "parameters": self.SCHEMA},
        }

    def format_call(self, arguments: Any) -> str:
        return f"{self.NAME}({json.dumps(arguments, ensure_ascii=False, separators=(',', ':'))})"

    @abc.abstractmethod
    async def execute(self, blackboard: B, arguments: JSONDict, context: Context, tracer: TraceNode) -> Any:
        """Run the tool; the return value (JSON-able) goes back to the model as the tool's result."""


#: `tools=` as a factory: (b) -> the tools offered to the model on this call.
LLMToolFactory = Callable[[B], list[Tool[B]]]
#: `on_llm_message=`: called (sync or async) with (b, message, tracer) for each message the node emits.
LLMMessageCallback = Callable[[B, JSONDict, TraceNode], Awaitable[None] | None]


def token_cost(spec: Any, prompt: int, completion: int, factor: float = 1.0) -> float:
    """USD for `prompt` and `completion` tokens at a model's prices per 1M tokens (0 without prices), x `factor`
    (a batch's discount): the estimate a budget admits and the cost of an answer whose provider reported none."""
    return (prompt * (getattr(spec, "input_price_per_m", 0.0) or 0.0)
            + completion * (getattr(spec, "output_price_per_m", 0.0) or 0.0)) / 1e6 * factor


def message_text(content: Any, sep: str = "") -> str:
    """An OpenAI message's `content` (a string, None, or a list of parts: strings, dicts or objects with `text`)
    as plain text, the parts joined with `sep`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            text = part if isinstance(part, str) else (
                part.get("text") if isinstance(part, dict) else getattr(part, "text", None))
            if isinstance(text, str):
                texts.append(text)
        return sep.join(texts)
    return str(content)
