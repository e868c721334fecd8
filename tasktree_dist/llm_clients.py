"""One AsyncOpenAI client per (base_url, api_key, client options) per event loop.

Reusing clients reuses HTTP connections, which is what makes a batch of thousands of calls fast; clients are
bound to the loop that made them because httpx connection pools are. `close_llm_clients()` closes the current
loop's clients (worker shutdown, end of a script).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Any

from openai import AsyncOpenAI

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncOpenAI]] = weakref.WeakKeyDictionary()

#: Connection limits suited to many concurrent LLM calls from one process (httpx's default is 100/20).
DEFAULT_MAX_CONNECTIONS = 1000


def _key(base_url: str | None, api_key: str | None, options: dict[str, Any]) -> str:
    return json.dumps([base_url, api_key, options], sort_keys=True, default=repr)


def get_llm_client(base_url: str | None, api_key: str | None, **options: Any) -> AsyncOpenAI:
    """The shared client for these settings on the running loop, created on first use."""
    loop = asyncio.get_running_loop()
    pool = _pools.setdefault(loop, {})
    key = _key(base_url, api_key, options)
    client = pool.get(key)
    if client is None:
        if "http_client" not in options:
            import httpx
            from openai import DefaultAsyncHttpxClient

            options["http_client"] = DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=DEFAULT_MAX_CONNECTIONS, max_keepalive_connections=200)
            )
        client = AsyncOpenAI(base_url=base_url, api_key=api_key, **options)
        pool[key] = client
    return client


async def close_llm_clients() -> int:
    """Close every client made on the running loop; returns how many were closed."""
    pool = _pools.pop(asyncio.get_running_loop(), {})
    for client in pool.values():
        await client.close()
    return len(pool)


def llm_client_count() -> int:
    try:
        return len(_pools.get(asyncio.get_running_loop(), {}))
    except RuntimeError:
        return 0
