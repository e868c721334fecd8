"""Saving and loading traces.

Ids sort by time and carry the tree name (`20261123-090102-123456-weather-agent-1a2b3c4d`, tinytasktree's
format), so a listing is ordered and a person can tell traces apart. Ids are validated before any file
system access: nothing a caller passes can name a path outside the trace directory.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as _dt
import heapq
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from ..core.errors import TasktreeProgrammingError
from ..core.trace import TraceNode

_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{6}-[a-z0-9_-]{1,24}-[0-9a-f]{8}")  # matched whole: fullmatch
_STAMP = "%Y%m%d-%H%M%S-%f"


class InvalidTraceIdError(TasktreeProgrammingError, ValueError):
    """A trace id that is not one this library makes (and so could name another path)."""


def trace_name(trace: dict[str, Any]) -> str:
    """The tree name a trace is about: the root's first child `Tree(X)` gives X."""
    children = trace.get("children") or {}
    first = next(iter(children.values()), None) if isinstance(children, dict) else None
    name = (first or {}).get("name") or trace.get("name") or "trace"
    match = re.fullmatch(r"Tree\((.*)\)", name.strip())
    return (match.group(1).strip() if match else name.strip()) or "trace"


def slugify(name: str, max_len: int = 24) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", re.sub(r"\s+", "-", name.strip().lower())).strip("-_")
    return slug[:max_len].rstrip("-_") or "trace"


def new_trace_id(name: str, at: _dt.datetime | None = None) -> str:
    return f"{(at or _dt.datetime.now()).strftime(_STAMP)}-{slugify(name)}-{uuid.uuid4().hex[:8]}"


def validate_trace_id(trace_id: str) -> str:
    if not isinstance(trace_id, str) or not _ID.fullmatch(trace_id):
        raise InvalidTraceIdError(f"Invalid trace_id: {trace_id!r}")
    return trace_id


def trace_created_at(trace_id: str) -> _dt.datetime:
    return _dt.datetime.strptime(trace_id[:22], _STAMP)


class TraceStorageHandler(abc.ABC):
    """Where traces go. Implement `save`, `query` and `list_traces` for another backend."""

    @abc.abstractmethod
    async def save(self, trace_root: TraceNode | dict[str, Any]) -> str:
        """Store a trace (a TraceRoot or its JSON) and return its id."""

    @abc.abstractmethod
    async def query(self, trace_id: str) -> dict[str, Any]:
        """The trace JSON saved under `trace_id` (FileNotFoundError when there is none)."""

    @abc.abstractmethod
    async def list_traces(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Saved traces, newest first: [{"id", "name", "created_at"}]."""


class FileTraceStorageHandler(TraceStorageHandler):
    """One JSON file per trace in a directory (the directory the trace server reads)."""

    def __init__(self, dirpath: str | os.PathLike[str] = ".traces") -> None:
        self._dirpath = Path(dirpath)

    @property
    def directory(self) -> Path:
        return self._dirpath

    def path_for(self, trace_id: str) -> Path:
        validate_trace_id(trace_id)
        base = self._dirpath.resolve()
        path = (base / f"{trace_id}.json").resolve()
        if path.parent != base:  # belt and braces: the pattern already forbids separators and dots
            raise InvalidTraceIdError(f"Invalid trace_id: {trace_id!r}")
        return path

    async def save(self, trace_root: TraceNode | dict[str, Any]) -> str:
        data = trace_root.json() if isinstance(trace_root, TraceNode) else dict(trace_root)
        trace_id = new_trace_id(trace_name(data))
        data["id"] = trace_id
        await asyncio.to_thread(self._write, self.path_for(trace_id), data)
        if isinstance(trace_root, TraceNode) and hasattr(trace_root, "trace_id"):
            trace_root.trace_id = trace_id  # type: ignore[attr-defined]
        return trace_id

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        self._dirpath.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, default=str, indent=1))
        os.replace(tmp, path)  # readers never see a half-written trace

    async def query(self, trace_id: str) -> dict[str, Any]:
        path = self.path_for(trace_id)
        return json.loads(await asyncio.to_thread(path.read_text))

    async def list_traces(self, limit: int | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._list, limit)

    def _list(self, limit: int | None) -> list[dict[str, Any]]:
        if not self._dirpath.is_dir() or (limit is not None and limit <= 0):
            return []
        ids = (p.name[:-5] for p in self._dirpath.iterdir() if p.name.endswith(".json"))
        valid = [i for i in ids if _ID.fullmatch(i)]
        newest = sorted(valid, reverse=True) if limit is None else heapq.nlargest(limit, valid)
        return [
            {"id": i, "name": f"{i}.json", "created_at": trace_created_at(i).isoformat(), "tree": i[23:-9]}
            for i in newest
        ]
