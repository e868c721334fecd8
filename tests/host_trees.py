"""Trees of the multi-host test (TASKTREE_IMPORTS=tests.host_trees): pieces that wait for a go key, and a unit
only host alpha's worker serves (its own queue)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field

from tasktree_dist import Tree

#: How long a piece waits for its go key at most (the test sets it long before).
GO_LIMIT_S = 90.0


@dataclass
class Piece:
    index: int = 0
    go_key: str = ""


async def piece(p: Piece) -> str:
    """Wait until the go key exists (set by the test once a host is cut off), then name the piece and the host."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(os.environ["TASKTREE_REDIS_URL"], socket_timeout=2, socket_connect_timeout=2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GO_LIMIT_S
    try:
        while loop.time() < deadline:
            try:
                if await client.exists(p.go_key):
                    break
            except (OSError, redis.RedisError):  # this host cut off: try again until the deadline
                pass
            await asyncio.sleep(0.1)  # polling period: the key is set by another process
    finally:
        await client.aclose()
    return f"piece{p.index}@{socket.gethostname()}"


PieceTree = Tree[Piece]("HostsPiece").Sequence()._().Function(piece).End()


@dataclass
class Job:
    count: int = 0
    go_key: str = ""
    results: list[str] = field(default_factory=list)


def pieces(j: Job) -> tuple[list[Tree[Piece]], list[Piece]]:
    return [PieceTree] * j.count, [Piece(i, j.go_key) for i in range(j.count)]


def keep(j: Job, results: list[str]) -> None:
    j.results = results


JobTree = Tree[Job]("HostsJob").Sequence()._().Gather(pieces, concurrency_limit=200)._().WriteBlackboard(keep).End()


@dataclass
class Where:
    host: str = ""


def where(w: Where) -> str:
    w.host = socket.gethostname()
    return w.host


#: Runs only where queue `alpha` is served: proof that host alpha's worker serves again after its link came back.
OnAlpha = Tree[Where]("HostsOnAlpha").Remote(queue="alpha")._().Function(where).End()
