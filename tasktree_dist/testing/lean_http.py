"""A lean HTTP/1.1 server protocol for the fake LLM server's hot path, handing every other request to aiohttp.

Why: aiohttp's server machinery (request objects, the handler task per connection, response writers, the router)
was ~60 % of the fake server's CPU per call, as much as the client it is there to measure. The calls a benchmark
makes, non-streaming chat completions, are parsed here with httptools (the C parser aiohttp itself builds on) and
answered with one write. Anything the caller's `route` declines (streams, the truncated fault, other paths, a
too-large body) hands the connection, with the request's bytes, to aiohttp's own protocol: one server, one port,
and aiohttp serves that connection from then on.

Limits: a request pipelined behind another on the same connection before its answer (which HTTP clients of the
fake server do not do) can only be served here; if it must go to aiohttp it is refused with a 400 and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
from multidict import CIMultiDict

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


@dataclass
class LeanRequest:
    """What a handler reads of a request: the attributes of aiohttp's web.Request the fake server uses."""

    method: str
    path: str
    query_string: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    headers: CIMultiDict[str]
    body: bytes
    #: Whatever `route` worked out while deciding (e.g. the parsed JSON body), for the handler.
    parsed: Any = None


@dataclass
class LeanResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


#: Decides on a complete request: True serves it here (through `Handler`), False hands the connection to aiohttp.
Route = Callable[[LeanRequest], bool]
Handler = Callable[[LeanRequest], Awaitable[LeanResponse]]


class LeanHTTPProtocol(asyncio.Protocol):
    """One connection: requests `route` accepts are answered by `handle` in order; the first one it declines moves
    the connection to the protocol `handover()` makes (aiohttp's request handler)."""

    def __init__(self, route: Route, handle: Handler, handover: Callable[[], asyncio.Protocol],
                 connections: set[LeanHTTPProtocol], max_body: int) -> None:
        self._route, self._handle, self._handover = route, handle, handover
        self._connections, self._max_body = connections, max_body
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._pending = bytearray()  # bytes since the current request began (what aiohttp gets on handover)
        self._completed_in_chunk = False
        self._offset_unknown = False  # a request began in the same chunk after one was answered here
        self._handing_over = False
        self._refusing = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._tasks: list[asyncio.Task[None]] = []

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        for task in self._tasks:  # the client went away: its handlers stop now (aiohttp's handler_cancellation)
            task.cancel()

    def data_received(self, data: bytes) -> None:
        if not self._offset_unknown:  # past that, no handover can happen: keep nothing
            self._pending += data
        self._completed_in_chunk = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._refuse(f"bad HTTP request: {exc}")
            return
        if self._handing_over:
            self._hand_over()
        elif self._completed_in_chunk:
            self._pending.clear()  # the chunk ended with the request answered here: nothing is owed to aiohttp

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self._completed_in_chunk:
            self._offset_unknown = True
        self._url, self._headers, self._body, self._size = b"", [], [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= self._max_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._handing_over:
            return
        url = httptools.parse_url(self._url)
        raw_headers = tuple(self._headers)
        request = LeanRequest(
            method=self._parser.get_method().decode(), path=url.path.decode("utf-8", "surrogateescape"),
            query_string=(url.query or b"").decode("utf-8", "surrogateescape"), raw_headers=raw_headers,
            headers=CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers),
            body=b"".join(self._body),
        )
        self._url = b""
        if self._size > self._max_body or not self._route(request):
            self._handing_over = True
            return
        self._completed_in_chunk = True
        keep_alive = self._parser.should_keep_alive()
        previous = self._tasks[-1] if self._tasks else None
        task = asyncio.get_running_loop().create_task(self._answer(request, keep_alive, previous))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # -- answering
    async def _answer(self, request: LeanRequest, keep_alive: bool, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # pipelined: answers go out in request order
            await asyncio.wait([previous])
        response = await self._handle(request)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(response.encode(keep_alive))
        if not keep_alive:
            transport.close()

    def _hand_over(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._tasks or self._offset_unknown:
            if not self._refusing:  # after the answers owed, in request order
                self._refusing = True
                owed = list(self._tasks)
                task = asyncio.get_running_loop().create_task(self._refuse_after(owed))
                self._tasks.append(task)
                task.add_done_callback(self._tasks.remove)
            return
        protocol = self._handover()
        self._connections.discard(self)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(bytes(self._pending))
        self._pending.clear()

    async def _refuse_after(self, owed: list[asyncio.Task[None]]) -> None:
        if owed:
            await asyncio.wait(owed)
        self._refuse("a request pipelined behind another that is not answered yet, to a route this server hands to "
                     "aiohttp: send it once the previous answer arrived")

    def _refuse(self, message: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
            self._transport.write(LeanResponse(400, body).encode(keep_alive=False))
            self._transport.close()

    def close(self) -> None:
        """Close the connection (the server is stopping); running handlers are cancelled by connection_lost."""
        if self._transport is not None:
            self._transport.close()
