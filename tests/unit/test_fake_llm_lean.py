"""The fake LLM server's lean HTTP layer (testing/lean_http.py) over raw sockets: the hot path served leanly, every
other request handed to aiohttp on the same connection, keep-alive, pipelining and clients that go away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from tasktree_dist.testing.fake_llm import ThreadedFakeLLM

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def chat(text: str, *headers: str, stream: bool = False) -> bytes:
    body = orjson.dumps({"model": "fake-gpt", "messages": [{"role": "user", "content": text}], "stream": stream})
    head = ["POST /v1/chat/completions?x=1 HTTP/1.1", "Host: t", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 10)
    return int(status_line.split()[1]), headers, body


@pytest.fixture
async def conn(fake_llm: ThreadedFakeLLM) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_llm.port)
    try:
        yield reader, writer
    finally:
        writer.close()


def answer(body: bytes) -> str:
    return orjson.loads(body)["choices"][0]["message"]["content"]


async def test_one_connection_serves_the_hot_path_leanly_then_aiohttp_for_the_rest(
    conn: Conn, fake_llm: ThreadedFakeLLM
) -> None:
    reader, writer = conn
    writer.write(chat("REPLY:one", "X-Trace: a"))
    status, headers, body = await response(reader)
    assert (status, answer(body)) == (200, "one") and "server" not in headers  # no aiohttp in the way
    assert fake_llm.request_meta[-1]["headers"]["x-trace"] == "a" and fake_llm.request_meta[-1]["query"] == {"x": "1"}
    writer.write(get("/stats"))  # not the hot path: the connection goes to aiohttp, bytes and all
    status, headers, body = await response(reader)
    assert status == 200 and orjson.loads(body)["calls"] == 1 and "aiohttp" in headers.get("server", "")
    writer.write(chat("REPLY:two"))  # aiohttp keeps serving this connection
    status, _, body = await response(reader)
    assert (status, answer(body), fake_llm.calls) == (200, "two", 2)


async def test_streams_and_the_truncated_fault_are_aiohttp_s(conn: Conn, fake_llm: ThreadedFakeLLM) -> None:
    reader, writer = conn
    writer.write(chat("REPLY:a b", stream=True))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b"text/event-stream" in head
    rest = await asyncio.wait_for(reader.readuntil(b"data: [DONE]\n\n"), 10)
    assert b'"content":"a' in rest
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_llm.port)
    try:
        writer.write(chat("REPLY:cut short", "X-Fake-Fault: truncated"))  # half a body, then the connection drops
        with pytest.raises(asyncio.IncompleteReadError):
            await response(reader)
    finally:
        writer.close()


async def test_keep_alive_pipelining_and_connection_close(conn: Conn) -> None:
    reader, writer = conn
    writer.write(chat("REPLY:first") + chat("REPLY:second") + chat("REPLY:third", "Connection: close"))
    answers = [answer((await response(reader))[2]) for _ in range(3)]
    assert answers == ["first", "second", "third"]  # in request order
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after the answer Connection: close asked for


async def test_errors_on_the_hot_path_are_the_openai_style_json_errors(conn: Conn) -> None:
    reader, writer = conn
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n{nope")
    status, headers, body = await response(reader)
    assert status == 400 and orjson.loads(body)["error"]["message"] == "request body is not valid JSON"
    writer.write(chat("REPLY:x", "X-Fake-Fault: fail-429", "X-Fake-Retry-After: 2"))
    status, headers, body = await response(reader)
    assert status == 429 and headers["retry-after"] == "2" and orjson.loads(body)["error"]["code"]


async def test_a_pipelined_request_for_aiohttp_behind_an_unanswered_one_is_refused(conn: Conn) -> None:
    reader, writer = conn
    writer.write(chat("REPLY:kept", "X-Fake-Latency-Ms: 200") + get("/stats"))
    status, _, body = await response(reader)
    assert (status, answer(body)) == (200, "kept")
    status, _, body = await response(reader)
    assert status == 400 and b"pipelined" in body
    assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_a_client_that_goes_away_frees_its_handler(conn: Conn, fake_llm: ThreadedFakeLLM) -> None:
    reader, writer = conn
    writer.write(chat("REPLY:late", "X-Fake-Latency-Ms: 60000"))
    deadline = time.monotonic() + 10
    while fake_llm.server.stats.in_flight < 1:
        assert time.monotonic() < deadline, "the request never arrived"
        await asyncio.sleep(0.01)  # polling with a deadline
    writer.close()
    while fake_llm.server.stats.in_flight:
        assert time.monotonic() < deadline, "the handler kept running after its client went away"
        await asyncio.sleep(0.01)


async def test_a_chunked_body_is_aiohttp_s_and_answered(conn: Conn, fake_llm: ThreadedFakeLLM) -> None:
    reader, writer = conn
    body = orjson.dumps({"model": "fake-gpt", "messages": [{"role": "user", "content": "REPLY:chunked"}]})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                 b"X-Fake-Cost: 0.5\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    status, _, raw = await response(reader)
    assert (status, answer(raw), orjson.loads(raw)["usage"]["cost"]) == (200, "chunked", 0.5)
    writer.write(chat("REPLY:after", "X-Fake-Cost: 0.25"))  # the same connection, aiohttp's from now on
    status, _, raw = await response(reader)
    assert (status, answer(raw), orjson.loads(raw)["usage"]["cost"], fake_llm.calls) == (200, "after", 0.25, 2)


async def test_x_fake_headers_reach_the_hot_path_in_any_case(conn: Conn, fake_llm: ThreadedFakeLLM) -> None:
    reader, writer = conn
    writer.write(chat("REPLY:priced", "x-FAKE-cost: 0.125") + chat("REPLY:free"))
    first, second = [orjson.loads((await response(reader))[2]) for _ in range(2)]
    assert first["usage"]["cost"] == 0.125 and "cost" not in second["usage"]
    assert [meta["headers"].get("x-fake-cost") for meta in fake_llm.request_meta] == ["0.125", None]
