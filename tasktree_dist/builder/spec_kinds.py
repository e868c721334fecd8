"""The node kinds a spec may use: each builder method, with its parameter names and what each parameter holds.

A parameter's *form* says how it is written and read back: a plain JSON value inline, a registered function's
name, an attribute name or a function, a registered store/tree/tool name, messages templates. `spec_build` turns
each form into what the node's constructor takes, `spec_write` turns a built node's value back into the form, and
`spec_schema` describes every form for editors. New kinds (WaitFor, custom nodes) join with `register_kind`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..nodes import composites, decorators, leaves
from ..nodes.base import Node
from ..nodes.cacher import Cacher
from ..nodes.placement import Local, Remote

#: Forms of parameters (see the module docstring).
VALUE = "value"  # any JSON value, checked by Param.schema
FUNCTION = "function"  # a registered function: `name` or {function: name}
ATTR_OR_FUNCTION = "attr_or_function"  # a blackboard attribute (a string) or {function: name}
TEXT_OR_FUNCTION = "text_or_function"  # a literal string or {function: name}
VALUE_OR_FUNCTION = "value_or_function"  # a JSON value (Param.schema) or {function: name}
STORE = "store"  # a registered store's name
TREE = "tree"  # a registered tree's name
TOOLS = "tools"  # a list of registered tool names, or {function: name}
MESSAGES = "messages"  # a list of {role, content} whose texts may hold {field} references, or {function: name}
EXPIRATION = "expiration"  # seconds, [min, max] seconds, or null
SCHEMA = "schema"  # a JSON Schema (self-contained), a registered pydantic model's name, or null

NUMBER = {"type": "number"}
POSITIVE_INT = {"type": "integer", "minimum": 1}


@dataclass(frozen=True)
class Param:
    name: str
    form: str = VALUE
    schema: dict[str, Any] = field(default_factory=dict)
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Kind:
    """A node kind: its spec name (the builder method's), how to make the node, how to read its parameters back."""

    name: str
    make: Callable[..., Node]
    params: tuple[Param, ...] = ()
    #: (min, max) children; None for max means any number.
    children: tuple[int, float] = (0, 0)
    #: The constructor's arguments of a built node (for to_spec); keys are parameter names.
    read: Callable[[Any], dict[str, Any]] = lambda node: {}
    #: The node's default name given its parameters (a name equal to it is not written by to_spec).
    default_name: Callable[[Any], str] = lambda node: node.default_name()
    description: str = ""
    #: A check of the node's parameters together (the written mapping): a problem's text, or None.
    check: Callable[[dict[str, Any]], str | None] = lambda data: None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_kinds: dict[str, Kind] = {}
#: Node KIND (trace name) -> spec kind, where they differ.
_by_node_kind: dict[str, str] = {}


def register_kind(kind: Kind, node_kind: str | None = None) -> Kind:
    """Add a node kind to the spec vocabulary (`node_kind`: the node class's KIND, when it differs)."""
    _kinds[kind.name] = kind
    if node_kind and node_kind != kind.name:
        _by_node_kind[node_kind] = kind.name
    return kind


def kind_named(name: str) -> Kind | None:
    return _kinds.get(name)


def kind_of_node(node: Node) -> Kind | None:
    return _kinds.get(_by_node_kind.get(node.KIND, node.KIND))


def kinds() -> dict[str, Kind]:
    return dict(_kinds)


def _condition_name(node: Any) -> str:
    return leaves.condition_name(node.condition.source)


def _condition(description: str) -> Param:
    return Param("attr_or_condition_func", ATTR_OR_FUNCTION, required=True, description=description)


def _leaf(name: str, make: Callable[..., Node], *params: Param, read: Callable[[Any], dict[str, Any]] | None = None,
          default_name: Callable[[Any], str] | None = None, description: str = "",
          check: Callable[[dict[str, Any]], str | None] | None = None) -> None:
    _add(name, make, params, (0, 0), read, default_name, description, check)


def _own_key_for_own_url(data: dict[str, Any]) -> str | None:
    """A spec naming a base_url names its key too: the processes' own key (OPENAI_API_KEY) never goes to a URL that
    a submitted document chose."""
    if data.get("base_url") is not None and data.get("api_key") is None:
        return ("an LLM with a base_url in the spec needs its api_key too (a value or {function: <name>}): the "
                "processes' own key is never sent to a URL a spec names")
    return None


def _add(name: str, make: Callable[..., Node], params: tuple[Param, ...], children: tuple[int, float],
         read: Callable[[Any], dict[str, Any]] | None, default_name: Callable[[Any], str] | None,
         description: str, check: Callable[[dict[str, Any]], str | None] | None = None) -> None:
    node_kind = getattr(make, "KIND", name)
    register_kind(Kind(name, make, params, children, read or (lambda node: {}),
                       default_name or (lambda node: node.default_name()), description,
                       check or (lambda data: None)), node_kind)


def _llm(**kwargs: Any) -> Node:
    from ..llm.node import LLM

    call_kwargs = kwargs.pop("llm_call_kwargs", None) or {}
    return LLM(**kwargs, **call_kwargs)


_llm.KIND = "LLM"  # type: ignore[attr-defined]


def _read_llm(node: Any) -> dict[str, Any]:
    return {"model": node.model, "messages": node.messages, "stream": node.stream, "api_key": node.api_key,
            "base_url": node.base_url, "client_kwargs": node.client_kwargs or None,
            "extra_body": node.extra_body or None, "tools": node.tools,
            "llm_call_kwargs": node.llm_call_kwargs or None, "batch": node.batch,
            "batch_fallback": node.batch_fallback}


_DATA_FACTORY = Param("result_factory", FUNCTION, description="(b) -> the data to return instead of the child's")
_KEY_FUNC = Param("key_func", FUNCTION, required=True, description="(b) -> the store key")
_STORE = Param("store", STORE, required=True, description="a store registered with register_store")
_CONCURRENCY = Param("concurrency_limit", schema=POSITIVE_INT, description="children running at once (default 3)")
_ANY = math.inf

# -- leaves ----------------------------------------------------------------------------------------------------------
_leaf("Function", leaves.Function, Param("func", FUNCTION, required=True, description="the work: (b) -> data"),
      read=lambda n: {"func": n.func}, description="Runs a registered function; its return value is the data.")
_leaf("Log", leaves.Log, Param("msg_or_factory", TEXT_OR_FUNCTION, required=True),
      Param("level", schema={"enum": ["debug", "info", "warning", "error"]}),
      read=lambda n: {"msg_or_factory": n.message, "level": n.level}, description="Writes a message to the trace.")
_leaf("TODO", leaves.TODO, description="A placeholder that succeeds.")
_leaf("Failure", leaves.Failure, description="Always fails.")
_leaf("ShowBlackboard", leaves.ShowBlackboard, description="Returns the blackboard (and shows it in the trace).")
_leaf("WriteBlackboard", leaves.WriteBlackboard, Param("attr_or_func", ATTR_OR_FUNCTION, required=True),
      read=lambda n: {"attr_or_func": n.target}, description="Stores the previous node's data in the blackboard.")
_leaf("Assert", leaves.Assert, _condition("an attribute that must be truthy, or a condition function"),
      read=lambda n: {"attr_or_condition_func": n.condition.source}, default_name=_condition_name,
      description="OK when the condition holds, else FAIL.")
_leaf("ParseJSON", leaves.ParseJSON, Param("src", ATTR_OR_FUNCTION), Param("dst", ATTR_OR_FUNCTION),
      Param("json_loader", FUNCTION),
      read=lambda n: {"src": n.src, "dst": n.dst,
                      "json_loader": None if n.loader is leaves.jsonload.load_json else n.loader},
      description="Parses JSON from the last result or an attribute.")
_leaf("Subtree", leaves.Subtree, Param("subtree", TREE, required=True, description="a registered tree's name"),
      Param("subtree_blackboard_factory", FUNCTION),
      read=lambda n: {"subtree": n.tree, "subtree_blackboard_factory": n.factory},
      description="Runs another registered tree.")
_leaf("LLM", _llm,
      Param("model", VALUE_OR_FUNCTION, {"type": "string", "minLength": 1}, required=True),
      Param("messages", MESSAGES, required=True,
            description="[{role, content}] with {field} references to the blackboard, or a function"),
      Param("stream", VALUE_OR_FUNCTION, {"type": "boolean"}),
      Param("api_key", VALUE_OR_FUNCTION, {"type": ["string", "null"]}),
      Param("base_url", VALUE_OR_FUNCTION, {"type": ["string", "null"]}),
      Param("client_kwargs", schema={"type": ["object", "null"], "additionalProperties": False, "properties": {
          "max_retries": {"type": "integer", "minimum": 0}, "timeout": {"type": "number", "exclusiveMinimum": 0}}},
          description="max_retries and timeout only: the endpoint and its key are not a document's to choose"),
      Param("extra_body", schema={"type": ["object", "null"]}),
      Param("tools", TOOLS, description="names of registered tools, or a function returning tools"),
      Param("max_retries", schema={"type": ["integer", "null"], "minimum": 0}),
      Param("timeout", schema={"type": ["number", "null"], "exclusiveMinimum": 0}),
      Param("llm_call_kwargs", schema={"type": ["object", "null"]}, description="temperature, max_tokens..."),
      Param("batch", VALUE_OR_FUNCTION, {"type": ["boolean", "null"]},
            description="send through the provider's Batch API (docs/llm-routing.md); null: the model's choice"),
      Param("batch_fallback", schema={"enum": ["live", "fail", None]},
            description="what a call the batch could not answer does; null: the model's choice"),
      read=_read_llm, description="One chat-completions call and the tool calls it asks for.",
      check=_own_key_for_own_url)

# -- decorators ------------------------------------------------------------------------------------------------------
_ONE, _TWO = (1, 1), (1, 2)
_add("ForceOk", decorators.ForceOk, (_DATA_FACTORY,), _ONE, lambda n: {"result_factory": n.result_factory}, None,
     "OK whatever the child returns.")
_add("ForceFail", decorators.ForceFail, (_DATA_FACTORY,), _ONE, lambda n: {"result_factory": n.result_factory}, None,
     "FAIL whatever the child returns.")
_add("Return", decorators.Return, (Param("result_factory", FUNCTION, required=True),), _ONE,
     lambda n: {"result_factory": n.result_factory}, None, "The child's status with other data.")
_add("Invert", decorators.Invert, (), _ONE, None, None, "OK <-> FAIL.")
_add("Retry", decorators.Retry, (
    Param("max_tries", schema=POSITIVE_INT, required=True),
    Param("sleep_secs", schema={"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"},
                                          {"type": "array", "items": {"type": "number", "minimum": 0}}]}),
), _ONE, lambda n: {"max_tries": n.max_tries, "sleep_secs": n.sleep_secs}, None, "Runs the child until it is OK.")
_add("While", decorators.While, (_condition("checked before each round"),
                                 Param("max_loop_times", schema=POSITIVE_INT)), _ONE,
     lambda n: {"attr_or_condition_func": n.condition.source, "max_loop_times": n.max_loop_times}, _condition_name,
     "Repeats the child while the condition holds.")
_add("Timeout", decorators.Timeout, (Param("secs", schema={"type": "number", "exclusiveMinimum": 0},
                                           required=True),), _TWO,
     lambda n: {"secs": n.secs}, None, "A time limit; the optional second child (a Fallback) runs on expiry.")
_add("Fallback", decorators.Fallback, (), _ONE, None, None, "The second child of Timeout or Terminable.")
_add("Wrapper", decorators.Wrapper, (Param("func", FUNCTION, required=True,
                                           description="(child, context) -> async context manager"),), _ONE,
     lambda n: {"func": n.func}, None, "Runs the child through a registered context manager.")
_add("Cacher", Cacher, (
    _KEY_FUNC, _STORE,
    Param("expiration", EXPIRATION, description="seconds, [min, max] seconds, or null (never)"),
    Param("value_validator", FUNCTION), Param("enabled", VALUE_OR_FUNCTION, {"type": "boolean"}),
), _ONE, lambda n: {"key_func": n.key_func, "store": n.store, "expiration": n.expiration,
                    "value_validator": n.value_validator, "enabled": n.enabled}, None,
     "Caches the child's OK data in a store.")
_add("Terminable", decorators.Terminable, (
    _KEY_FUNC, _STORE, Param("monitor_interval_ms", schema={"type": "number", "exclusiveMinimum": 0}),
), _TWO, lambda n: {"key_func": n.key_func, "store": n.store, "monitor_interval_ms": n.monitor_interval_ms}, None,
     "Stops the child when a key appears in the store; the optional second child then runs.")
_add("Remote", Remote, (Param("queue", schema={"type": ["string", "null"]}),), _ONE,
     lambda n: {"queue": n.queue}, None, "Ships the child subtree whole to a worker.")
_add("Local", Local, (), _ONE, None, None, "Keeps the child subtree in the coordinator.")

# -- composites ------------------------------------------------------------------------------------------------------
_add("Sequence", composites.Sequence, (), (0, _ANY), None, None, "Children in order until one fails.")
_add("Selector", composites.Selector, (), (0, _ANY), None, None, "Children in order until one succeeds.")
_add("Parallel", composites.Parallel, (_CONCURRENCY,), (0, _ANY),
     lambda n: {"concurrency_limit": n.concurrency_limit}, None, "All children at once; OK if all are.")
_add("Gather", composites.Gather, (Param("params_factory", FUNCTION, required=True,
                                         description="(b) -> (trees, blackboards)"), _CONCURRENCY), (0, 0),
     lambda n: {"params_factory": n.params_factory, "concurrency_limit": n.concurrency_limit}, None,
     "Runs trees, each on its own blackboard.")
_add("RandomSelector", composites.RandomSelector, (
    Param("weights", VALUE_OR_FUNCTION, {"type": ["array", "null"], "items": {"type": "number",
                                                                              "exclusiveMinimum": 0}}),
), (0, _ANY), lambda n: {"weights": n.weights}, None, "A Selector over a (weighted) random order.")
_add("If", composites.If, (_condition("decides the branch"),), _TWO,
     lambda n: {"attr_or_condition_func": n.condition.source}, _condition_name,
     "The first child when the condition holds, else the second (an Else).")
_add("Else", composites.Else, (), _ONE, None, None, "The second child of If.")


# -- waits -----------------------------------------------------------------------------------------------------------
def _wait_for(**kwargs: Any) -> Node:
    from ..nodes.wait import WaitFor

    return WaitFor(**kwargs)


def _read_wait(node: Any) -> dict[str, Any]:
    from ..nodes.wait import NO_DEFAULT

    schema = node.schema.model if node.schema.model is not None else node.schema.json_schema
    return {"name": node.wait_name, "schema": schema, "timeout_s": node.timeout_s, "prompt": node.prompt,
            **({} if node.default is NO_DEFAULT else {"default": node.default})}


_wait_for.KIND = "WaitFor"  # type: ignore[attr-defined]
_leaf("WaitFor", _wait_for,
      Param("name", schema={"type": "string", "minLength": 1, "pattern": "^[^/\n\r]*$"}, required=True,
            description="the signal's name (the wait's `name`: it also names the node)"),
      Param("schema", SCHEMA, description="the payload's JSON Schema, or a registered pydantic model's name"),
      Param("timeout_s", schema={"type": ["number", "null"], "exclusiveMinimum": 0}),
      Param("default", description="returned (OK) when the wait times out; without it a timeout FAILs"),
      Param("prompt", TEXT_OR_FUNCTION, description="shown to whoever answers"),
      read=_read_wait, description="Parks the run until the signal `name` arrives (docs/waits.md).")

#: Kinds a spec may name that this version does not offer (none now: WaitFor joined).
RESERVED_KINDS: tuple[str, ...] = ()
