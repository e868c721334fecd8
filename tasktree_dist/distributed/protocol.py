"""The two messages of distributed execution, as pydantic models (JSON on the wire, validated on arrival).

A Unit carries ids only (tree, fingerprint, node address, snapshot key...): blackboards travel through Redis,
not through the broker. A Completion carries the outcome back through Redis to the coordinator's reply list.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from ..core.result import Result, Status
from ..core.trace import TraceNode
from . import keys, record_codec


class Unit(BaseModel):
    run_id: str
    execution_id: str
    tree: str
    fingerprint: str
    #: Address of the node to run; None runs the whole tree (a Gather child).
    address: str | None = None
    #: Gather index of the tree, for its trace name `{index}_Tree(X)`.
    index: int | None = None
    snapshot: str
    #: The coordinator's last result (serde-encoded), so `context._last_result` works across the boundary.
    last_result: Any = None
    reply_to: str
    queue: str
    #: When the coordinator sent it (stamped at send time), for `queued_ms`.
    sent_at: float = 0.0
    #: 1 for the first send; more when a worker died running it (its lease expired) and it was sent again.
    dispatch: int = 1
    #: False: the coordinator keeps no trace for this unit (a child of a large fan-out) and the reply carries
    #: totals and alerts instead of the trace fragment (its unit record keeps everything). A FAIL always has it.
    reply_trace: bool = True
    #: A continuation (batch mode, llm.batch_park): the execution id of the unit's first run (its batched calls'
    #: custom ids derive from it), which round this is, and the custom ids whose waits are over.
    batch_origin: str | None = None
    batch_round: int = 0
    batch_awaited: list[str] | None = None
    #: The fan-out's slot gate (distributed.gates) when it sends more units than its concurrency limit: the unit
    #: runs once it holds one of `gate_limit` slots fleet-wide; its worker hands the slot on when it ends.
    gate: str | None = None
    gate_limit: int = 0

    @field_validator("gate")
    @classmethod
    def _gate(cls, value: str | None) -> str | None:
        """A message must not make a worker write to an arbitrary Redis key: the gate is a name within its run."""
        if value is not None and (not value or len(value) > 300 or any(c in value for c in " \n\r\t{}")):
            raise ValueError(f"invalid gate {value[:80]!r}")
        return value

    @field_validator("reply_to")
    @classmethod
    def _reply_list(cls, value: str) -> str:
        """A message must not make a worker write to an arbitrary Redis key."""
        if not value.startswith(keys.reply("")) or len(value) > 200:
            raise ValueError(f"reply_to must be a tasktree reply list ({keys.reply('<id>')}), got {value[:80]!r}")
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not value or len(value) > 128 or any(c in value for c in " \n\r\t{}"):
            raise ValueError(f"invalid run id {value[:80]!r}")
        return value

    @property
    def where(self) -> str:
        return self.address or (f"{self.tree}[{self.index}]" if self.index is not None else self.tree)


class Completion(BaseModel):
    execution_id: str
    status: Literal["OK", "FAIL"]
    data: Any = None
    #: Changed blackboard fields (see changes.py); None when the unit never ran.
    changes: dict[str, Any] | None = None
    #: The trace fragment of what ran (see trace.TraceNode.to_fragment).
    trace: dict[str, Any] | None = None
    error: str | None = None
    worker: str = ""
    pid: int = 0
    celery_task_id: str = ""
    queue: str = ""
    queued_ms: float = 0.0
    run_ms: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)
    #: In a reply without its trace: the fragment's cost and tokens, and its warnings/errors (path, level, text).
    totals: dict[str, Any] | None = None
    alerts: list[tuple[str, str, str]] | None = None
    #: The unit parked batched calls (their custom ids): it is not done; its continuation runs once they are
    #: answered (distributed.dispatch).
    awaiting: list[str] | None = None

    def to_record(self) -> bytes:
        """The form a unit record is stored (and sent) in: compressed JSON (record_codec)."""
        return record_codec.pack(self.model_dump_json().encode())

    @classmethod
    def from_record(cls, stored: bytes | str) -> Completion:
        """A completion from a unit record or a reply (compressed or plain JSON); ValueError when unreadable."""
        return cls.model_validate_json(record_codec.unpack(stored))

    @property
    def ok(self) -> bool:
        """The unit ran and its node returned OK (an error always means FAIL)."""
        return self.status == "OK" and not self.error

    def fill(self, node: TraceNode, absorb: bool = False) -> None:
        """Put what the worker ran into the trace node made for the unit when it was sent (absorb: the unit is
        that very node, e.g. a shipped leaf; otherwise the placeholder becomes the worker's node)."""
        fragment = self.trace
        if fragment:
            node.absorb(fragment)
            if not absorb:
                node.name = fragment.get("name", node.name)
                node.kind = fragment.get("kind", node.kind)
                node.started = float(fragment.get("started") or node.started)
                ended = fragment.get("ended")
                node.ended = float(ended) if ended is not None else time.time()
        elif not absorb:
            node.set_end(Result(Status.FAIL, None))
        node.attributes.update(
            worker=self.worker, pid=self.pid, celery_task_id=self.celery_task_id, queue=self.queue,
            queued_ms=self.queued_ms, worker_run_ms=self.run_ms, **self.extra,
        )
        if self.error:
            node.error(self.error)
            node.attributes["error"] = self.error
