"""How LLM calls are sent: the direct transport against openai-python's create(), and openai imported lazily.

The direct transport (tasktree_dist.llm.direct) must send what create() sends (headers, query, body), fail with
the same openai exceptions, retry by the same policy, and hand a call to create() whenever it cannot reproduce
it. The node's trace says which way each call went (`transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tasktree_dist import (
    Context,
    LLMModel,
    LLMProvider,
    Result,
    Status,
    TraceNode,
    Tree,
    close_llm_clients,
)
from tasktree_dist.core.settings import get_settings
from tasktree_dist.llm import clients as llm_clients
from tasktree_dist.llm import direct as llm_direct
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tests.helpers import llm_nodes, user

KEY = "sk-test"
pytestmark = pytest.mark.usefixtures("llm_clients_closed")


async def run_llm(fake: ThreadedFakeLLM, model: str = "fake-gpt", text: str = "REPLY:ok", **kwargs: Any) -> TraceNode:
    """Run one LLM node (no retries unless given) and return its trace node."""
    kwargs.setdefault("max_retries", 0)
    tree = Tree().LLM(model, user(text), base_url=fake.base_url, api_key=KEY, **kwargs).End()
    context = Context()
    async with context.using_blackboard(None):
        await tree(context)
    (node,) = llm_nodes(context)
    return node


async def on_both(monkeypatch: pytest.MonkeyPatch, call: Any) -> dict[str, Any]:
    """`await call()` once per transport: {"direct": ..., "openai": ...}."""
    outcomes = {}
    for transport in ("direct", "openai"):
        monkeypatch.setattr(get_settings(), "llm_transport", transport)
        outcomes[transport] = await call()
    return outcomes


# --------------------------------------------------------------------------- the same request, the same failures


async def test_direct_sends_what_create_sends(fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client headers and query, per-call extra_headers / extra_query / extra_body: the server sees the same."""
    options = {
        "client_kwargs": {"default_headers": {"X-Client": "c"}, "default_query": {"from_client": "yes", "n": 1}},
        "extra_headers": {"X-Call": "1", "x-client": "per call"},
        "extra_query": {"api-version": "2024-01", "flag": True},
        "extra_body": {"more": [1, 2], "reasoning": {"enabled": False}},
    }
    nodes = await on_both(monkeypatch, lambda: run_llm(fake_llm, text="REPLY:same", **options))
    assert [node.attributes["transport"] for node in nodes.values()] == ["direct", "openai"]
    assert all(node.result.status is Status.OK for node in nodes.values())
    direct, sent = fake_llm.request_meta
    query = {"from_client": "yes", "n": "1", "api-version": "2024-01", "flag": "true"}
    assert direct["query"] == sent["query"] == query
    headers = direct["headers"]
    assert headers["authorization"] == f"Bearer {KEY}" and headers["user-agent"].startswith("AsyncOpenAI/Python")
    assert headers["x-call"] == "1" and headers["x-client"] == "per call" and headers["x-stainless-retry-count"] == "0"
    differs = {"connection"}  # httpx says keep-alive; aiohttp keeps HTTP/1.1's default
    assert {k: v for k, v in headers.items() if k not in differs} == {
        k: v for k, v in sent["headers"].items() if k not in differs}
    direct_body, sent_body = fake_llm.requests
    assert direct_body == sent_body
    assert direct_body["more"] == [1, 2] and "extra_body" not in direct_body and "extra_headers" not in direct_body


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 418, 422, 503])
async def test_status_errors_match_create(
    fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """Each status maps to the same openai exception class and message (the body's error.message)."""
    fault = {"client_kwargs": {"default_headers": {"X-Fake-Fault": f"fail-{status}"}}}
    nodes = await on_both(monkeypatch, lambda: run_llm(fake_llm, **fault))
    seen = [(n.attributes["error"], n.attributes["error_type"], n.attributes["status_code"]) for n in nodes.values()]
    assert seen[0] == seen[1]
    assert seen[0][0].endswith(f"Error code: {status} - Fake error {status}")
    assert fake_llm.calls == 2


async def test_client_retries_follow_max_retries(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    """max_retries=2: two 429s (retry-after-ms: 10) are retried, the third try answers; each try says its number."""
    node = await run_llm(fake_llm, "x-fail-429-first-2", "REPLY:at last", max_retries=2)
    assert node.result.status is Status.OK and node.result.data.final_output == "at last"
    assert node.attributes["transport"] == transport
    assert [meta["headers"]["x-stainless-retry-count"] for meta in fake_llm.request_meta] == ["0", "1", "2"]


async def test_per_call_timeout(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    """A `timeout` among the call options (here from the model) bounds that call only."""
    model = LLMModel("timeout", provider=LLMProvider(fake_llm.base_url, KEY), llm_call_kwargs={"timeout": 0.3})
    tree = Tree().LLM(model, user("x"), max_retries=0).End()
    context = Context()
    async with context.using_blackboard(None):
        result = await tree(context)
    assert result.status is Status.FAIL
    (node,) = llm_nodes(context)
    assert node.attributes["error_type"] == "APITimeoutError" and node.attributes["transport"] == transport
    assert fake_llm.request_meta[0]["headers"]["x-stainless-read-timeout"] == "0.3"


# --------------------------------------------------------------------------- what goes through create() instead


async def test_streams_go_through_create(fake_llm: ThreadedFakeLLM) -> None:
    node = await run_llm(fake_llm, text="REPLY:a b", stream=True)
    assert node.result.status is Status.OK and node.attributes["transport"] == "openai"


async def test_a_callers_http_client_goes_through_create(fake_llm: ThreadedFakeLLM) -> None:
    """The caller's http_client may carry proxies, mounts or event hooks only openai-python would use."""
    node = await run_llm(fake_llm, client_kwargs={"http_client": llm_clients.new_http_client("httpx")})
    assert node.result.status is Status.OK and node.attributes["transport"] == "openai"
    node = await run_llm(fake_llm)
    assert node.attributes["transport"] == "direct"


async def test_a_body_orjson_does_not_encode_plainly_goes_through_create(fake_llm: ThreadedFakeLLM) -> None:
    """A datetime is left to openai-python's encoder (ISO format), exactly as before."""
    node = await run_llm(fake_llm, metadata={"when": datetime.datetime(2024, 1, 2, 3, 4, 5)})
    assert node.result.status is Status.OK and node.attributes["transport"] == "openai"
    assert fake_llm.requests[0]["metadata"] == {"when": "2024-01-02T03:04:05"}


async def test_a_pydantic_response_format_gets_creates_own_error(fake_llm: ThreadedFakeLLM) -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        value: int

    node = await run_llm(fake_llm, response_format=Answer)
    assert node.result.status is Status.FAIL and node.attributes["transport"] == "openai"
    assert "chat.completions.parse()" in node.attributes["error"]
    assert fake_llm.calls == 0


# --------------------------------------------------------------------------- the session


async def test_the_session_closes_with_the_clients(fake_llm: ThreadedFakeLLM) -> None:
    await run_llm(fake_llm)
    session = llm_clients.get_llm_session()
    assert llm_clients.get_llm_session() is session and not session.closed
    assert await close_llm_clients() == 1
    assert session.closed
    assert llm_clients.get_llm_session() is not session  # a new one on next use


def test_the_session_closes_with_its_loop(fake_llm: ThreadedFakeLLM) -> None:
    """A script that never calls close_llm_clients(): asyncio.run closes the loop's session on its way out."""
    sessions: list[Any] = []

    async def script() -> Result:
        node = await run_llm(fake_llm)
        sessions.append(llm_clients.get_llm_session())
        return node.result

    results: list[Result] = []
    thread = threading.Thread(target=lambda: results.append(asyncio.run(script())))
    thread.start()
    thread.join(10)
    assert results[0].status is Status.OK
    assert sessions[0].closed


# --------------------------------------------------------------------------- openai-python's retry policy


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({}, None),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "1e400"}, llm_direct.MAX_RETRY_AFTER_S + 1),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, "past"),
        ({"retry-after": "not a date"}, None),
    ],
)
def test_server_delay(headers: dict[str, str], delay: Any) -> None:
    got = llm_direct.server_delay(headers)
    if delay == "past":
        assert got is not None and got < 0
    else:
        assert got == delay


@pytest.mark.parametrize(
    ("status", "headers", "retry"),
    [
        (400, {}, False),
        (404, {}, False),
        (408, {}, True),
        (409, {}, True),
        (429, {}, True),
        (500, {}, True),
        (503, {}, True),
        (400, {"x-should-retry": "true"}, True),
        (503, {"x-should-retry": "false"}, False),
        (429, {"retry-after": "121"}, False),  # more than two minutes: give up now
        (429, {"retry-after": "121", "x-should-retry": "true"}, False),
        (429, {"retry-after": "120"}, True),
    ],
)
def test_should_retry(status: int, headers: dict[str, str], retry: bool) -> None:
    assert llm_direct.should_retry(status, headers) is retry


def test_retry_delay_backs_off_with_jitter() -> None:
    for retries_taken, full in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0), (5000, 8.0)]:
        delays = [llm_direct.retry_delay(retries_taken) for _ in range(50)]
        assert all(0.75 * full <= d <= full for d in delays)
    assert llm_direct.retry_delay(0, {"retry-after-ms": "10"}) == 0.01
    assert llm_direct.retry_delay(0, {"retry-after": "0"}) <= 0.5  # no usable server delay: back off
    assert llm_direct.retry_delay(1, {"retry-after": "500"}) <= 1.0


# --------------------------------------------------------------------------- import cost


def test_importing_the_package_does_not_import_openai() -> None:
    """openai is most of the import time: it loads on the first LLM call (or at a worker's start), not before."""
    code = "import sys, tasktree_dist; print(sorted(m for m in ('openai', 'httpx2', 'aiohttp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the lean HTTP/1.1 client (llm/http1.py)


class _OneAnswerPerConnection:
    """A server that answers the first request of each connection (keep-alive) and closes the connection when a
    second one arrives, without answering it: what a server that drops idle connections looks like to a client."""

    def __init__(self) -> None:
        self.connections = 0
        #: One item per connection whose handler returned (the client closed it, or it was dropped here).
        self.ended: asyncio.Queue[None] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                if answered:
                    break
                body = b'{"ok": true}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
                answered = True
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.ended.put_nowait(None)


@contextlib.asynccontextmanager
async def _serving(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                   ssl: Any = None) -> AsyncIterator[int]:
    """A server on a free local port (yields the port). On the way out the loop's LLM clients are closed before the
    server: since Python 3.12 Server.wait_closed() also waits for every open connection, and the lean client keeps
    its last one alive until then."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        await close_llm_clients()
        server.close()
        try:
            async with asyncio.timeout(10):
                await server.wait_closed()
        except TimeoutError:
            pytest.fail("a connection to the test server is still open after close_llm_clients()")


def _lean_call(port: int, scheme: str = "http", host: str = "127.0.0.1") -> tuple[Any, bytes, Any]:
    """(url, request bytes, timeouts) of a POST to the local server."""
    import aiohttp
    from yarl import URL

    from tasktree_dist.llm import http1

    url = URL(f"{scheme}://{host}:{port}/v1/chat/completions")
    data = http1.request_bytes(url, {"Content-Type": "application/json"}, b"{}")
    return url, data, aiohttp.ClientTimeout(sock_connect=5, sock_read=5)


@pytest.mark.skipif(not llm_direct.http1.AVAILABLE, reason="httptools is not installed")
async def test_the_lean_client_keeps_connections_alive_and_replaces_one_the_server_dropped() -> None:
    from tasktree_dist.llm import http1

    peer = _OneAnswerPerConnection()
    async with _serving(peer.handle) as port:
        url, data, limits = _lean_call(port)
        for _ in range(3):  # each on the connection kept from the call before, which the server then drops
            status, headers, body = await http1.post(url, data, limits, lambda: None)
            assert (status, headers["content-type"], body) == (200, "application/json", b'{"ok": true}')
        assert peer.connections == 3  # one per answer: the dropped connection was replaced, not reported


@pytest.mark.skipif(not llm_direct.http1.AVAILABLE, reason="httptools is not installed")
async def test_closing_the_loops_llm_clients_closes_the_lean_clients_kept_connections() -> None:
    """A kept-alive connection left open holds the server's side open (and, since Python 3.12, a server's
    wait_closed()): close_llm_clients() closes them, and the next call opens a new one."""
    from tasktree_dist.llm import http1

    peer = _OneAnswerPerConnection()
    async with _serving(peer.handle) as port:
        url, data, limits = _lean_call(port)
        assert (await http1.post(url, data, limits, lambda: None))[0] == 200
        assert peer.ended.empty()  # kept alive
        await close_llm_clients()
        await asyncio.wait_for(peer.ended.get(), timeout=10)  # the server saw the client close it
        assert (await http1.post(url, data, limits, lambda: None))[0] == 200
        assert peer.connections == 2


@pytest.mark.skipif(not llm_direct.http1.AVAILABLE, reason="httptools is not installed")
async def test_the_lean_client_reuses_one_connection_for_calls_in_turn(fake_llm: ThreadedFakeLLM) -> None:
    from tasktree_dist.llm import http1

    opened: list[str] = []
    pool_open = http1._Pool.open

    async def counting(self: Any, url: Any, connect_s: Any, ssl_context: Any) -> Any:
        opened.append(str(url))
        return await pool_open(self, url, connect_s, ssl_context)

    http1._Pool.open = counting  # type: ignore[method-assign]
    try:
        for _ in range(3):
            node = await run_llm(fake_llm)
            assert node.result.status is Status.OK and node.attributes["transport"] == "direct"
    finally:
        http1._Pool.open = pool_open  # type: ignore[method-assign]
    assert len(opened) == 1


@pytest.mark.skipif(not llm_direct.http1.AVAILABLE, reason="httptools is not installed")
async def test_the_lean_client_speaks_tls_with_the_context_it_is_given(tmp_path: Any) -> None:
    import shutil
    import ssl

    from tasktree_dist.llm import http1

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run, ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                         "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out",
                         str(cert)], check=True, capture_output=True, timeout=60)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    peer = _OneAnswerPerConnection()
    async with _serving(peer.handle, ssl=server_side) as port:
        url, data, limits = _lean_call(port, "https", "localhost")

        def trusting() -> ssl.SSLContext:
            return ssl.create_default_context(cafile=str(cert))

        assert (await http1.post(url, data, limits, trusting))[2] == b'{"ok": true}'
        await close_llm_clients()  # the loop's TLS context goes with its connections: the next one is made anew
        with pytest.raises(http1.ConnectFailed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await http1.post(url, data, limits, ssl.create_default_context)


@pytest.mark.skipif(not llm_direct.http1.AVAILABLE, reason="httptools is not installed")
@pytest.mark.parametrize(("answer", "outcome"), [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"ok\": true}", b'{"ok": true}'),  # ends with the connection
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"ok\": tr", "ClientPayloadError"),  # cut short
    (b"", "ServerDisconnectedError"),  # closed without a word
])
async def test_the_lean_client_reads_a_body_up_to_the_close_and_names_a_cut_one(answer: bytes, outcome: Any) -> None:
    import aiohttp

    from tasktree_dist.llm import http1

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with _serving(once) as port:
        url, data, limits = _lean_call(port)
        if isinstance(outcome, bytes):
            assert (await http1.post(url, data, limits, lambda: None))[2] == outcome
        else:
            with pytest.raises(getattr(aiohttp, outcome)):
                await http1.post(url, data, limits, lambda: None)
