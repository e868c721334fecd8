"""A lean HTTP/1.1 POST for the direct transport: keep-alive connections per host on the running loop, the request
written as one bytes object, the response parsed by httptools (llhttp, in C).

Why: with the provider's answer parsed by orjson, aiohttp's request machinery (URL and header objects, timers,
stream readers, the connector's bookkeeping) was half of an LLM call's client CPU. Failures are raised as the
aiohttp exceptions the direct transport already maps to openai's (`clients.httpx_error`), so retries, timeouts and
error texts stay the same. Without httptools, or with TASKTREE_LLM_HTTP_CLIENT=aiohttp, the aiohttp session sends.
"""

from __future__ import annotations

import asyncio
import time
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Idle keep-alive connections are dropped after this long (servers close theirs after 5 s or more).
KEEPALIVE_S = 4.0
#: How long close_connections() waits for a closing connection (a TLS one says goodbye) before aborting it.
CLOSE_WAIT_S = 1.0

try:
    import httptools
except ImportError:  # pragma: no cover - an optional speed-up: aiohttp sends instead
    httptools = None

#: Without httptools the direct transport sends over an aiohttp session.
AVAILABLE = httptools is not None


class ConnectFailed(aiohttp.ClientConnectionError):
    """The connection could not be opened (refused, unreachable, TLS handshake failed)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body: list[bytes] = []
        self._received = False
        self._keep_alive = False
        self._headers_done = False
        self.deadline: asyncio.Timeout | None = None
        self.read_s: float | None = None
        #: Done when the transport is gone (the socket closed): what close_connections() waits for.
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self.deadline is not None and self.read_s is not None:  # a read timeout counts from the last byte
            self.deadline.reschedule(asyncio.get_running_loop().time() + self.read_s)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - never asked for
            self._fail(aiohttp.ClientPayloadError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(aiohttp.ClientPayloadError(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and self._delimited_by_close():
                self._waiter.set_result(None)  # a body without a length ends with the connection
            elif self._received:
                self._fail(aiohttp.ClientPayloadError("Response payload is not completed"))
            else:
                self._fail(aiohttp.ServerDisconnectedError())

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()  # (llhttp forgets it once the message is complete)
        self._headers_done = True

    def _delimited_by_close(self) -> bool:
        return "Content-Length" not in self._headers and "chunked" not in self._headers.get("Transfer-Encoding", "")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- use
    def _fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, data: bytes, read_s: float | None) -> tuple[int, CIMultiDict[str], bytes]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._headers, self._body, self._received, self._keep_alive = CIMultiDict(), [], False, False
        self._headers_done = False
        self.read_s = read_s
        self.transport.write(data)
        async with asyncio.timeout_at(None if read_s is None else loop.time() + read_s) as deadline:
            self.deadline = deadline if read_s is not None else None
            try:
                await self._waiter
            finally:
                self.deadline = None
        body = b"".join(self._body)
        encoding = self._headers.get("Content-Encoding", "").lower()
        if encoding in ("gzip", "deflate"):
            try:
                body = zlib.decompress(body, 47)  # gzip or zlib, detected from the header
            except zlib.error as exc:
                raise aiohttp.ClientPayloadError(f"cannot decode a {encoding} body: {exc}") from None
        return self.parser.get_status_code(), self._headers, body

    def reusable(self) -> bool:
        return not self.closed and self._keep_alive


class _Pool:
    """The running loop's idle connections by (scheme, host, port)."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self.ssl: Any = None
        self.closed = False

    def take(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.close()
        return None

    def give_back(self, key: tuple[str, str, int], connection: _Connection) -> None:
        if self.closed:  # the loop's clients were closed while this call ran
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self.idle.setdefault(key, []).append(connection)

    async def close(self) -> int:
        """Close every idle connection and wait (CLOSE_WAIT_S at most, then abort) until their sockets are closed;
        connections still busy close when their call ends. Returns how many were closed."""
        self.closed = True
        connections = [connection for idle in self.idle.values() for connection in idle]
        self.idle.clear()
        for connection in connections:
            connection.close()
        if connections:
            await asyncio.wait([connection.lost for connection in connections], timeout=CLOSE_WAIT_S)
            for connection in connections:
                if not connection.lost.done() and connection.transport is not None:
                    connection.transport.abort()
        return len(connections)

    async def open(self, url: URL, connect_s: float | None, ssl_context: Callable[[], Any]) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = url.scheme == "https"
        if tls and self.ssl is None:
            self.ssl = ssl_context()
        try:
            async with asyncio.timeout(connect_s):
                _, connection = await loop.create_connection(
                    _Connection, url.host, url.port, ssl=self.ssl if tls else None,
                    server_hostname=url.host if tls else None,
                )
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {url.host}:{url.port}") from None
        except OSError as exc:
            raise ConnectFailed(f"Cannot connect to host {url.host}:{url.port} ssl:{tls} [{exc}]") from exc
        return connection


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool] = weakref.WeakKeyDictionary()


def _pool() -> _Pool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = _Pool()
    return pool


async def close_connections() -> int:
    """Close the running loop's kept-alive connections (close_llm_clients() does, with the loop's clients): a
    connection left open keeps the server's side open too. Returns how many were closed."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    return 0 if pool is None else await pool.close()


def request_bytes(url: URL, headers: dict[str, Any], payload: bytes) -> bytes:
    """The whole POST as bytes (headers whose value is openai's Omit are left out, as aiohttp's call does)."""
    host = url.raw_host if url.port == _DEFAULT_PORTS.get(url.scheme) else f"{url.raw_host}:{url.port}"
    lines = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if isinstance(value, str | int | float)]
    if not any(name.lower() == "accept-encoding" for name in headers):
        lines.append("Accept-Encoding: gzip, deflate")  # as create() sends (bodies are decoded in `request`)
    lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


async def post(
    url: URL, data: bytes, limits: aiohttp.ClientTimeout, ssl_context: Callable[[], Any]
) -> tuple[int, CIMultiDict[str], bytes]:
    """Send `data` (request_bytes) to url's host on a kept-alive connection, or a new one; (status, headers, body).
    A kept-alive connection the server closed before answering anything is replaced once, transparently.
    `ssl_context()` makes the TLS context of https hosts (once per loop)."""
    pool = _pool()
    key = (url.scheme, url.raw_host or "", url.port or 0)
    connection = pool.take(key)
    reused = connection is not None
    if connection is None:
        connection = await pool.open(url, limits.sock_connect, ssl_context)
    try:
        answer = await _exchange(connection, data, limits.sock_read)
    except aiohttp.ServerDisconnectedError:
        if not reused:
            raise
        connection = await pool.open(url, limits.sock_connect, ssl_context)  # the server dropped the idle one
        answer = await _exchange(connection, data, limits.sock_read)
    if connection.reusable():
        pool.give_back(key, connection)
    else:
        connection.close()
    return answer


async def _exchange(connection: _Connection, data: bytes, read_s: float | None) -> tuple[int, CIMultiDict[str], bytes]:
    try:
        return await connection.request(data, read_s)
    except BaseException:  # a timeout, a cancel, a broken answer: the connection cannot carry another request
        connection.close()
        raise
