"""tasktree_dist: behavior-tree task trees (the tinytasktree API) in one process or across Celery workers."""

from typing import Any

from .core.callables import adapt
from .core.context import Context
from .core.errors import TasktreeError, TasktreeProgrammingError
from .core.executor import Executor, LocalExecutor
from .core.hooks import (
    register_global_hook_after_spawned_task_finish,
    unregister_global_hook_after_spawned_task_finish,
)
from .core.log import DISABLE_TASKTREE_LOGGING, set_logging_disabled
from .core.progress import ProgressEvent, rich_progress
from .core.registry import get_tree, register_tree
from .core.result import Result, Status
from .core.serde import register_type
from .core.store import CacheStore, InMemoryCacheStore, RedisStore
from .core.tree import Tree
from .llm.budget import Budget, LLMBudgetExceeded
from .llm.clients import close_llm_clients, get_llm_client
from .llm.flow_stats import FlowStats, flow_stats
from .llm.node import LLM
from .llm.types import LLMModel, LLMProvider, LLMRunRecord, Tool, ToolCall, ToolFunction, ToolResult
from .nodes.base import CompositeNode, DecoratorNode, InternalNode, LeafNode, Node, SingleChildNode
from .nodes.composites import Else, Gather, If, Parallel, RandomSelector, Selector, Sequence
from .nodes.decorators import (
    Cacher,
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
from .nodes.leaves import TODO, Assert, Failure, Function, Log, ParseJSON, ShowBlackboard, Subtree, WriteBlackboard
from .tracing.storage import FileTraceStorageHandler, TraceStorageHandler
from .tracing.trace import TraceNode, Tracer, TraceRoot

JSON = Any
"""Any JSON value; an alias kept for tinytasktree compatibility in annotations."""

__version__ = "0.1.0"

__all__ = [
    "DISABLE_TASKTREE_LOGGING",
    "JSON",
    "TODO",
    "Assert",
    "Budget",
    "CacheStore",
    "Cacher",
    "CompositeNode",
    "Context",
    "DecoratorNode",
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
    "LLM",
    "LLMBudgetExceeded",
    "LLMModel",
    "LLMProvider",
    "LLMRunRecord",
    "Invert",
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
    "Selector",
    "Sequence",
    "ShowBlackboard",
    "SingleChildNode",
    "Status",
    "Subtree",
    "TasktreeError",
    "TasktreeProgrammingError",
    "Terminable",
    "Timeout",
    "TraceNode",
    "TraceRoot",
    "Tool",
    "ToolCall",
    "ToolFunction",
    "ToolResult",
    "TraceStorageHandler",
    "Tracer",
    "Tree",
    "While",
    "Wrapper",
    "WriteBlackboard",
    "adapt",
    "close_llm_clients",
    "flow_stats",
    "get_llm_client",
    "get_tree",
    "register_global_hook_after_spawned_task_finish",
    "register_tree",
    "register_type",
    "rich_progress",
    "set_logging_disabled",
    "unregister_global_hook_after_spawned_task_finish",
]
