"""tasktree_dist: behavior-tree task trees (the tinytasktree API) in one process or across Celery workers."""

from typing import Any

from . import _wiring  # noqa: F401  (connects core.instruments to metrics, distributed to runs)
from .builder import Tree
from .builder.spec_names import register_function, register_store, register_tool
from .builder.spec_source import SpecError
from .core import hooks as _hooks
from .core import log as _log
from .core.aliases import install_live_aliases as _install_live_aliases
from .core.blackboard import AnyB
from .core.callables import adapt
from .core.context import Context
from .core.errors import SignalError, TasktreeError, TasktreeProgrammingError, WaitTimeout
from .core.executor import Executor, LocalExecutor
from .core.hooks import (
    register_global_hook_after_spawned_task_finish,
    unregister_global_hook_after_spawned_task_finish,
)
from .core.log import set_logging_disabled
from .core.progress import ProgressEvent, rich_progress
from .core.registry import get_tree, register_tree
from .core.result import Result, Status
from .core.serde import UnregisteredTypeWarning, register_type
from .core.store import CacheStore, InMemoryCacheStore, RedisStore
from .core.trace import TraceLevel, TraceNode, Tracer, TraceRoot
from .llm.budget import Budget, LLMBudgetExceeded
from .llm.clients import close_llm_clients, get_llm_client
from .llm.flow_stats import FlowStats, flow_stats
from .llm.node import LLM, LLMNode
from .llm.types import (
    LLMDeployment,
    LLMMessageCallback,
    LLMModel,
    LLMProvider,
    LLMRunRecord,
    LLMToolFactory,
    Tool,
    ToolCall,
    ToolFunction,
    ToolResult,
)
from .nodes import jsonload as _jsonload
from .nodes.base import CompositeNode, DecoratorNode, InternalNode, LeafNode, Node, SingleChildNode
from .nodes.cacher import Cacher
from .nodes.composites import Else, Gather, If, Parallel, RandomSelector, Selector, Sequence
from .nodes.decorators import (
    Fallback,
    ForceFail,
    ForceOk,
    Invert,
    Retry,
    Return,
    Terminable,
    Timeout,
    While,
    Wrapper,
)
from .nodes.jsonload import JSONLoader
from .nodes.leaves import TODO, Assert, Failure, Function, Log, ParseJSON, ShowBlackboard, Subtree, WriteBlackboard
from .nodes.wait import WaitFor
from .tracing.httpserver import create_http_app, run_httpserver
from .tracing.storage import FileTraceStorageHandler, TraceStorageHandler

JSON = Any
"""Any JSON value; an alias kept for tinytasktree compatibility in annotations."""

__version__ = "0.1.0"

# What tinytasktree's users and tests patch on the module reaches the code that uses it (see core/aliases.py).
_install_live_aliases(
    __name__,
    {
        "json_repair": (_jsonload, "json_repair"),
        "DISABLE_TASKTREE_LOGGING": (_log, "DISABLE_TASKTREE_LOGGING"),
        "_GLOBAL_HOOK_AFTER_SPAWNED_TASK_FINISH": (_hooks, "_hooks"),
    },
)

#: Names loaded on first use: runs and the Celery side need Celery, which a single-process user of the engine should
#: not pay for at `import tasktree_dist`.
_LAZY = {
    **dict.fromkeys(
        ("Run", "RunClient", "RunEvent", "RunNotFoundError", "RunQueryError", "RunState", "RunStateError",
         "RunStatus", "SubmitError"),
        "runs",
    ),
    **dict.fromkeys(("BlackboardConflictError", "CeleryExecutor", "DispatchError", "create_app"), "distributed"),
}

__all__ = [
    "AnyB",
    "Assert",
    "BlackboardConflictError",
    "Budget",
    "CacheStore",
    "Cacher",
    "CeleryExecutor",
    "CompositeNode",
    "Context",
    "DISABLE_TASKTREE_LOGGING",
    "DecoratorNode",
    "DispatchError",
    "Else",
    "Executor",
    "Failure",
    "Fallback",
    "FileTraceStorageHandler",
    "FlowStats",
    "ForceFail",
    "ForceOk",
    "Function",
    "Gather",
    "If",
    "InMemoryCacheStore",
    "InternalNode",
    "Invert",
    "JSON",
    "JSONLoader",
    "LLM",
    "LLMBudgetExceeded",
    "LLMDeployment",
    "LLMMessageCallback",
    "LLMModel",
    "LLMNode",
    "LLMProvider",
    "LLMRunRecord",
    "LLMToolFactory",
    "LeafNode",
    "LocalExecutor",
    "Log",
    "Node",
    "Parallel",
    "ParseJSON",
    "ProgressEvent",
    "RandomSelector",
    "RedisStore",
    "Result",
    "Retry",
    "Return",
    "Run",
    "RunClient",
    "RunEvent",
    "RunNotFoundError",
    "RunQueryError",
    "RunState",
    "RunStateError",
    "RunStatus",
    "Selector",
    "Sequence",
    "ShowBlackboard",
    "SignalError",
    "SingleChildNode",
    "SpecError",
    "Status",
    "SubmitError",
    "Subtree",
    "TODO",
    "TasktreeError",
    "TasktreeProgrammingError",
    "Terminable",
    "Timeout",
    "Tool",
    "ToolCall",
    "ToolFunction",
    "ToolResult",
    "TraceLevel",
    "TraceNode",
    "TraceRoot",
    "TraceStorageHandler",
    "Tracer",
    "Tree",
    "UnregisteredTypeWarning",
    "WaitFor",
    "WaitTimeout",
    "While",
    "Wrapper",
    "WriteBlackboard",
    "adapt",
    "close_llm_clients",
    "create_app",
    "create_http_app",
    "flow_stats",
    "get_llm_client",
    "get_tree",
    "register_function",
    "register_global_hook_after_spawned_task_finish",
    "register_store",
    "register_tool",
    "register_tree",
    "register_type",
    "rich_progress",
    "run_httpserver",
    "set_logging_disabled",
    "unregister_global_hook_after_spawned_task_finish",
]


def __getattr__(name: str) -> Any:
    package = _LAZY.get(name)
    if package is None:
        raise AttributeError(f"module 'tasktree_dist' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{package}", __name__), name)
