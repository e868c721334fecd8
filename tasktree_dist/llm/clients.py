"""One AsyncOpenAI client per (base_url, api_key, client options) per event loop, and one aiohttp session.

Reusing clients reuses HTTP connections, which is what makes a batch of thousands of calls fast; clients are
bound to the loop that made them because connection pools are. The session carries the direct transport's
calls (llm_direct). `close_llm_clients()` closes the current loop's clients, session and the lean client's
kept-alive connections (worker shutdown, end of a script).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import json
import os
import sys
import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any

import orjson

from ..core.loops import CloseWithTheLoop

if TYPE_CHECKING:  # openai and aiohttp are imported on first use: openai is most of `import tasktree_dist`'s time
    import aiohttp
    from openai import AsyncOpenAI

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, AsyncOpenAI]] = weakref.WeakKeyDictionary()
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()
#: Clients whose HTTP client is ours (not one the caller passed in client_kwargs): the direct transport may serve them.
_own_http: weakref.WeakSet[AsyncOpenAI] = weakref.WeakSet()

#: Connection limits suited to many concurrent LLM calls from one process (httpx's default is 100/20).
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_KEEPALIVE_CONNECTIONS = 200
DEFAULT_KEEPALIVE_S = 5.0  # httpx's keep-alive expiry
_KEY_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS


def transport() -> str:
    """How the LLM node sends non-streaming calls (TASKTREE_LLM_TRANSPORT, read at each call): "direct" (llm.direct:
    orjson and the lean HTTP/1.1 client with openai-python's configuration, retry policy and exceptions; a fraction
    of the CPU), "direct-aiohttp" (the same over an aiohttp session), "openai" (always `chat.completions.create`,
    for instrumentation that hooks it: OpenTelemetry, Langfuse...) or "openai-httpx" (create() over httpx)."""
    from ..core.settings import get_settings  # pydantic-settings loads on first use, not at `import tasktree_dist`

    return get_settings().llm_transport


def http_backend() -> str:
    """The HTTP stack under openai-python: "aiohttp" (an httpx transport over aiohttp, below) unless the transport
    is "openai-httpx". With a hundred concurrent calls aiohttp costs about a third less CPU per call: httpx's pool
    rescans every connection on each request and response, so its cost grows with the concurrency."""
    return "httpx" if transport() == "openai-httpx" else "aiohttp"


def _key(base_url: str | None, api_key: str | None, options: dict[str, Any]) -> Any:
    """The pool key: equal settings, one client (objects among the options count by repr, i.e. by identity)."""
    if not options:
        return base_url, api_key
    try:
        return base_url, api_key, orjson.dumps(options, default=repr, option=_KEY_OPTIONS)
    except TypeError:  # what orjson refuses (e.g. huge ints)
        return json.dumps([base_url, api_key, options], sort_keys=True, default=repr)


def _httpx_module() -> ModuleType:
    """The httpx flavour this openai-python builds on (httpx, or httpx2 in newer releases)."""
    from openai import DefaultAsyncHttpxClient

    for base in DefaultAsyncHttpxClient.__mro__:
        if base.__name__ == "AsyncClient":
            return importlib.import_module(base.__module__.split(".")[0])
    return importlib.import_module("httpx")


def httpx_error(httpx: ModuleType, exc: BaseException) -> Exception:
    """The httpx exception openai-python expects for an aiohttp failure: timeouts become httpx timeouts
    (APITimeoutError), everything else httpx transport errors (APIConnectionError)."""
    import aiohttp

    from . import http1

    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc) or "timed out connecting")
    if isinstance(exc, TimeoutError):  # SocketTimeoutError, ServerTimeoutError, asyncio timeouts
        return httpx.ReadTimeout(str(exc) or "timed out reading the response")
    if isinstance(exc, aiohttp.ClientConnectorError | http1.ConnectFailed):
        return httpx.ConnectError(str(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"peer closed the connection: {exc}")
    return httpx.ReadError(f"{type(exc).__name__}: {exc}")


def _new_session(httpx: ModuleType, max_connections: int, keepalive_s: float, **options: Any) -> aiohttp.ClientSession:
    """An aiohttp session with a generous connection limit and httpx's TLS defaults (certifi)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive_s,
                                     ssl=httpx.create_ssl_context())
    return aiohttp.ClientSession(connector=connector, **options)


def aiohttp_timeout(connect: float | None, read: float | None, pool: float | None) -> aiohttp.ClientTimeout:
    """httpx's timeouts in aiohttp's terms (no total: a long answer that keeps arriving is not cut)."""
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read, connect=pool)


def _aiohttp_transport(httpx: ModuleType, max_connections: int, keepalive_s: float) -> Any:
    """An httpx transport that sends requests with aiohttp (a project dependency): a fraction of httpx's CPU per
    call under high concurrency. openai-python only sees httpx requests, responses and exceptions."""
    import aiohttp

    class AiohttpStream(httpx.AsyncByteStream):  # type: ignore[misc, name-defined]
        def __init__(self, response: aiohttp.ClientResponse) -> None:
            self._response = response

        async def __aiter__(self) -> Any:
            try:
                async for chunk in self._response.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise httpx_error(httpx, exc) from exc

        async def aclose(self) -> None:
            self._response.release()

    class AiohttpTransport(httpx.AsyncBaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self._session: aiohttp.ClientSession | None = None

        async def handle_async_request(self, request: Any) -> Any:
            if self._session is None or self._session.closed:
                # decompression is left to httpx (it set the headers); proxies: see new_http_client
                self._session = _new_session(httpx, max_connections, keepalive_s, auto_decompress=False)
            t = request.extensions.get("timeout") or {}
            timeout = aiohttp_timeout(t.get("connect"), t.get("read"), t.get("pool"))
            try:
                body = request.content  # openai-python sends buffered bodies
            except httpx.RequestNotRead:
                body = await request.aread()
            try:
                response = await self._session.request(
                    request.method, str(request.url), data=body or None,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                    allow_redirects=False, timeout=timeout, compress=None,
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise httpx_error(httpx, exc) from exc
            return httpx.Response(
                response.status, headers=response.raw_headers, stream=AiohttpStream(response), request=request,
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
            )

        async def aclose(self) -> None:
            if self._session is not None:
                await self._session.close()
                self._session = None

    return AiohttpTransport()


def proxies_from_env() -> bool:
    """Proxy variables are set: leave them to httpx (aiohttp would re-read the environment on every request)."""
    import urllib.request

    return bool(urllib.request.getproxies())


def new_http_client(backend: str | None = None) -> Any:
    """An HTTP client for AsyncOpenAI(http_client=...): openai's defaults, generous connection limits, and the
    aiohttp transport unless `backend` (default: http_backend()) is "httpx" or aiohttp is missing."""
    from openai import DefaultAsyncHttpxClient

    httpx = _httpx_module()
    limits = httpx.Limits(
        max_connections=DEFAULT_MAX_CONNECTIONS, max_keepalive_connections=DEFAULT_MAX_KEEPALIVE_CONNECTIONS
    )
    if (backend or http_backend()) == "aiohttp" and not proxies_from_env():
        try:
            keepalive_s = limits.keepalive_expiry or DEFAULT_KEEPALIVE_S
            transport = _aiohttp_transport(httpx, DEFAULT_MAX_CONNECTIONS, keepalive_s)
        except ImportError:
            pass
        else:
            return DefaultAsyncHttpxClient(limits=limits, transport=transport)
    return DefaultAsyncHttpxClient(limits=limits)


def _loop_pool(loop: asyncio.AbstractEventLoop) -> dict[Any, AsyncOpenAI]:
    """The loop's client pool, created (with its closer) on first use."""
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = {}
        _close_with_the_loop.register(loop)
    return pool


def get_llm_client(base_url: str | None, api_key: str | None, **options: Any) -> AsyncOpenAI:
    """The shared client for these settings on the running loop, created on first use."""
    pool = _loop_pool(asyncio.get_running_loop())
    key = _key(base_url, api_key, options)
    client = pool.get(key)
    if client is None:
        from openai import AsyncOpenAI

        own_http = "http_client" not in options
        if own_http:
            options["http_client"] = new_http_client()
        client = AsyncOpenAI(base_url=base_url, api_key=api_key, **options)
        if own_http:
            _own_http.add(client)
        pool[key] = client
    return client


def shared_client(*, base_url: str | None = None, api_key: str | None = None, **options: Any) -> AsyncOpenAI:
    """The LLM node's default client factory: get_llm_client's shared client. Without a key, OPENAI_API_KEY, as
    openai-python does whatever the base_url; without either, openai's OpenAIError (the node FAILs, no request)."""
    if api_key is None:
        api_key = os.environ.get("OPENAI_API_KEY")
    if api_key is None:
        from openai import OpenAIError

        raise OpenAIError("no API key: pass api_key=, set it on the LLMProvider, or set OPENAI_API_KEY")
    return get_llm_client(base_url, api_key, **options)


def has_own_http_client(client: AsyncOpenAI) -> bool:
    """The client was made here with our HTTP client (not one passed in client_kwargs)."""
    return client in _own_http


def get_llm_session() -> aiohttp.ClientSession:
    """The running loop's aiohttp session for direct calls, created on first use; closed with the loop's clients.
    No cookie jar: API calls are stateless, and one session serves every client on the loop."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        import aiohttp

        _loop_pool(loop)  # registers the loop's closer
        session = _sessions[loop] = _new_session(
            _httpx_module(), DEFAULT_MAX_CONNECTIONS, DEFAULT_KEEPALIVE_S, cookie_jar=aiohttp.DummyCookieJar()
        )
    return session


@atexit.register
def _close_at_exit() -> None:
    """At interpreter exit, close the clients of loops that never shut down (e.g. a worker's loop thread)."""
    for loop, pool in list(_pools.items()):
        if not (pool or loop in _sessions) or loop.is_closed():
            continue
        try:
            if loop.is_running():  # in another (daemon) thread: let that loop do it
                asyncio.run_coroutine_threadsafe(close_llm_clients(), loop).result(timeout=2)
            else:
                loop.run_until_complete(close_llm_clients())
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


async def close_llm_clients() -> int:
    """Close every client (and the direct transport's session and kept-alive connections) made on the running loop;
    returns how many clients were closed."""
    loop = asyncio.get_running_loop()
    pool = _pools.pop(loop, {})
    for client in pool.values():
        await client.close()
    session = _sessions.pop(loop, None)
    if session is not None:
        await session.close()
    http1 = sys.modules.get(f"{__package__}.http1")  # the lean client, once imported (not before: it needs aiohttp)
    if http1 is not None:
        await http1.close_connections()
    await _close_with_the_loop.forget()
    return len(pool)


def llm_client_count() -> int:
    try:
        return len(_pools.get(asyncio.get_running_loop(), {}))
    except RuntimeError:
        return 0


#: Closes the loop's clients when it shuts down, for code that never calls close_llm_clients().
_close_with_the_loop = CloseWithTheLoop(close_llm_clients)
