"""A lean HTTP/1.1 server protocol for the fake LLM server's hot path, handing every other request to aiohttp.

Why: aiohttp's server machinery (request objects, the handler task per connection, response writers, the router)
was ~60 % of the fake server's CPU per call, as much as the client it is there to measure. The calls a benchmark
makes, non-streaming chat completions, are parsed here with httptools (the C parser aiohttp itself builds on) and
answered with one write, through a callback: the handler needs no task of its own (a timer for its latency).
Anything the caller's `route` declines (streams, the truncated fault, other paths, a too-large body) hands the
connection, with the request's bytes, to aiohttp's own protocol: one server, one port,
and aiohttp serves that connection from then on.

Headers are read from the request's bytes, not through httptools' per-header callback (14 Python calls per request
from openai-python, 5-12 us of the ~45 us this layer spends on a call): only those with the given prefix are
decoded; the rest stay raw until someone iterates them. A request with a chunked body goes to aiohttp.

Limits: a request pipelined behind another on the same connection before its answer (which HTTP clients of the
fake server do not do) can only be served here; if it must go to aiohttp it is refused with a 400 and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import http
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


class Headers(dict[str, str]):
    """The headers a handler looks up, by name in any case (lower-case keys): only those starting with the prefix
    the protocol was given are decoded (all of them stay in `raw_headers`); decoding every header of every request
    cost more than the rest of the parsing."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name.lower() if isinstance(name, str) else name)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())


class RawHeaders:
    """A request's header lines as (name, value) byte pairs, split from its head only when iterated."""

    __slots__ = ("head",)

    def __init__(self, head: bytes) -> None:
        self.head = head  # the request line and the header lines, without the blank line

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            yield name, value.strip()


@dataclass
class LeanRequest:
    """What a handler reads of a request: the attributes of aiohttp's web.Request the fake server uses."""

    method: str
    path: str
    query_string: str
    raw_headers: RawHeaders
    #: The headers named with the protocol's `header_prefix` (e.g. "x-fake-"), by name in any case.
    headers: Headers
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
#: Answers a request by calling `reply` once, now or later; returns what stops it if the client goes away first.
Handler = Callable[[LeanRequest, Callable[[LeanResponse], None]], Callable[[], None] | None]


class _Owed:
    """One request's place in the connection's answer order."""

    __slots__ = ("keep_alive", "response", "cancel")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.response: LeanResponse | None = None
        self.cancel: Callable[[], None] | None = None


class LeanHTTPProtocol(asyncio.Protocol):
    """One connection: requests `route` accepts are answered by `handle`, in request order; the first one it
    declines moves the connection to the protocol `handover()` makes (aiohttp's request handler)."""

    def __init__(self, route: Route, handle: Handler, handover: Callable[[], asyncio.Protocol],
                 connections: set[LeanHTTPProtocol], max_body: int, header_prefix: bytes = b"") -> None:
        self._route, self._handle, self._handover = route, handle, handover
        self._connections, self._max_body = connections, max_body
        self._prefix, self._prefix_len = header_prefix.lower(), len(header_prefix)
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._pending = bytearray()  # bytes received, from where the current request began on
        self._start = 0  # where the next request begins in _pending, once the current one is complete
        self._head = b""  # the current request's line and headers
        self._body_at = 0  # where its body begins in _pending
        self._handing_over = False
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0
        self._owed: deque[_Owed] = deque()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        owed, self._owed = self._owed, deque()
        for item in owed:  # the client went away: its handlers stop now (aiohttp's handler_cancellation)
            if item.response is None and item.cancel is not None:
                item.cancel()

    def data_received(self, data: bytes) -> None:
        self._pending += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._refuse(f"bad HTTP request: {exc}")
            return
        if self._handing_over:
            self._hand_over()
        elif self._start:  # what was answered here is owed to no one
            del self._pending[:self._start]
            self._body_at -= self._start
            self._start = 0

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._body, self._size = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        end = self._pending.find(b"\r\n\r\n", self._start)
        if end < 0:  # not the CRLF framing this layer reads headers by: aiohttp's parser decides
            self._handing_over = True
            return
        self._head, self._body_at = bytes(self._pending[self._start:end]), end + 4
        if b"\r\nexpect:" in self._head.lower():  # "100-continue": aiohttp's to answer before the body comes
            self._handing_over = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= self._max_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._handing_over:
            return
        head, lower = self._head, self._head.lower()
        if b"\r\ntransfer-encoding:" in lower:  # its bytes on the wire are not its body's: aiohttp's
            self._handing_over = True
            return
        named = Headers()
        if self._prefix and self._prefix in lower:
            for name, value in RawHeaders(head):
                if name[:self._prefix_len].lower() == self._prefix:
                    named[name.decode("latin-1").lower()] = value.decode("latin-1")
        url = httptools.parse_url(self._url)
        request = LeanRequest(
            method=self._parser.get_method().decode(), path=url.path.decode("utf-8", "surrogateescape"),
            query_string=(url.query or b"").decode("utf-8", "surrogateescape"), raw_headers=RawHeaders(head),
            headers=named, body=b"".join(self._body),
        )
        self._url = b""
        if self._size > self._max_body or not self._route(request):
            self._handing_over = True
            return
        self._start = self._body_at + self._size
        owed = _Owed(self._parser.should_keep_alive())
        self._owed.append(owed)
        owed.cancel = self._handle(request, lambda response: self._reply(owed, response))

    # -- answering
    def _reply(self, owed: _Owed, response: LeanResponse) -> None:
        owed.response = response
        while self._owed and self._owed[0].response is not None:  # pipelined: answers go out in request order
            item = self._owed.popleft()
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            transport.write(item.response.encode(item.keep_alive))  # type: ignore[union-attr]
            if not item.keep_alive:
                transport.close()
                return

    def _hand_over(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._owed:
            if not any(item.cancel is _REFUSED for item in self._owed):  # refused after the answers owed, in order
                refusal = _Owed(keep_alive=False)
                refusal.cancel = _REFUSED
                self._owed.append(refusal)
                self._reply(refusal, _refusal("a request pipelined behind another that is not answered yet, to a "
                                              "route this server hands to aiohttp: send it once the previous "
                                              "answer arrived"))
            return
        protocol = self._handover()
        self._connections.discard(self)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(bytes(self._pending[self._start:]))
        self._pending.clear()

    def _refuse(self, message: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_refusal(message).encode(keep_alive=False))
            self._transport.close()

    def close(self) -> None:
        """Close the connection (the server is stopping); handlers still running are stopped by connection_lost."""
        if self._transport is not None:
            self._transport.close()


def _REFUSED() -> None:  # noqa: N802 - a marker: the refusal slot has nothing to stop
    return None


def _refusal(message: str) -> LeanResponse:
    return LeanResponse(400, orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}}))
