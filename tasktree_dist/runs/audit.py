"""The audit: who (a token's name, or the operator of a CLI), what (submit, signal, cancel, retry, or a refused
attempt), when, from where. Each entry goes to the fleet-wide audit stream (capped at TASKTREE_AUDIT_MAX, living
TASKTREE_AUDIT_TTL after its last entry) and, when it concerns an existing run, to that run's event stream as an
`audit` event (so a run's page shows who cancelled it). Writing is best effort: an audit that cannot be written is
logged, and the action it describes is not undone (Redis being away already failed the action itself)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from ..core.log import logger
from ..core.redis_client import connect
from ..distributed import keys


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the audit: `who` did `action` (on `run`, from `address`) with `outcome`, and why (`detail`)."""

    id: str
    who: str
    action: str
    outcome: str
    run: str | None = None
    address: str | None = None
    detail: str | None = None

    @property
    def time(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(int(self.id.split("-", 1)[0]) / 1000, _dt.UTC)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "time": self.time.isoformat()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class AuditLog:
    """Over a redis-py client: synchronous for the threaded HTTP server (`record`), asyncio for RunClient
    (`arecord`)."""

    def __init__(self, redis: Any, max_entries: int, ttl: int, run_retention: int, events_max: int) -> None:
        self.redis = redis
        self.max_entries, self.ttl = max_entries, ttl
        self.run_retention, self.events_max = run_retention, events_max

    @classmethod
    def from_settings(cls, settings: Any) -> AuditLog:
        client = connect(settings.redis_url, asynchronous=False, socket_timeout=5, socket_connect_timeout=5)
        return cls(client, settings.audit_max, settings.audit_ttl, settings.run_retention, settings.events_max)

    def record(self, who: str, action: str, outcome: str, run: str | None = None, address: str | None = None,
               detail: str | None = None) -> None:
        try:
            self._queue(who, action, outcome, run, address, detail).execute()
        except Exception as exc:  # noqa: BLE001 - the audit must not turn an answered request into a crash
            logger.warning("audit entry not written (%s %s by %s): %s", action, outcome, who, exc)

    async def arecord(self, who: str, action: str, outcome: str, run: str | None = None,
                      address: str | None = None, detail: str | None = None) -> None:
        try:
            await self._queue(who, action, outcome, run, address, detail).execute()
        except Exception as exc:  # noqa: BLE001 - the action is done: a lost entry is logged, not raised
            logger.warning("audit entry not written (%s %s by %s): %s", action, outcome, who, exc)

    def _queue(self, who: str, action: str, outcome: str, run: str | None, address: str | None,
               detail: str | None) -> Any:
        """The entry's commands in a pipeline of this log's client (one round trip, sync or asyncio)."""
        fields = {k: v for k, v in {"who": who, "action": action, "outcome": outcome, "run": run,
                                    "address": address, "detail": detail}.items() if v}
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(keys.AUDIT, fields, maxlen=self.max_entries, approximate=True)
        pipe.expire(keys.AUDIT, self.ttl)
        if run:  # NOMKSTREAM: an unknown run id gets no stream of its own
            event = {"type": "audit", "data": orjson.dumps({k: v for k, v in fields.items() if k != "run"})}
            pipe.xadd(keys.events(run), event, maxlen=self.events_max, approximate=True, nomkstream=True)
        return pipe

    def entries(self, limit: int = 100, run: str | None = None) -> list[AuditEntry]:
        """Newest first; with `run`, only that run's entries (from the newest `limit * 10` of the stream)."""
        raw = self.redis.xrevrange(keys.AUDIT, count=limit if run is None else limit * 10)
        out = []
        for entry_id, fields in raw:
            data = {_text(k): _text(v) for k, v in fields.items()}
            if run is not None and data.get("run") != run:
                continue
            out.append(AuditEntry(_text(entry_id), data.get("who", "?"), data.get("action", "?"),
                                  data.get("outcome", "?"), data.get("run"), data.get("address"), data.get("detail")))
            if len(out) == limit:
                break
        return out

    def close(self) -> None:
        self.redis.close()
