"""Blackboard snapshots in Redis, keyed by content hash.

Branches that start from the same state (Parallel children, retries) share one key; a TTL bounds their life.
Encoding goes through serde, so a field that cannot cross processes fails at dispatch naming the field and its type.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from ..core.errors import TasktreeError
from ..core.serde import encode_value
from . import keys


class BlackboardTooLargeError(TasktreeError):
    pass


def encode_blackboard(blackboard: Any, limit_bytes: int) -> tuple[Any, bytes]:
    """(encoded JSON value, bytes) of a blackboard; raises EncodingError / BlackboardTooLargeError with details."""
    encoded = encode_value(blackboard, "blackboard")
    # a copy sized to its length: orjson (3.12 and later) hands back a buffer of at least 4 KB and never trims it,
    # and a payload is kept as long as its unit is out (2,000 of a 100,000-item batch: 8 MB instead of 0.3 MB)
    payload = bytes(memoryview(orjson.dumps(encoded)))
    if len(payload) > limit_bytes:
        raise BlackboardTooLargeError(
            f"blackboard {type(blackboard).__name__} encodes to {len(payload)} bytes, over the limit of "
            f"{limit_bytes} (TASKTREE_MAX_BLACKBOARD_BYTES); keep large data in external storage and store a key"
        )
    return encoded, payload


def snapshot_key(run_id: str, payload: bytes) -> str:
    return keys.snapshot(run_id, hashlib.blake2b(payload, digest_size=16).hexdigest())


async def store_snapshots(redis: Any, run_id: str, payloads: list[bytes], ttl: int) -> list[str]:
    """Store each payload of the run under its content key (one round trip for all) and return the keys."""
    names = [snapshot_key(run_id, payload) for payload in payloads]
    pipe = redis.pipeline(transaction=False)
    for name, payload in dict(zip(names, payloads, strict=True)).items():
        pipe.set(name, payload, ex=ttl)
    await pipe.execute()
    return names
