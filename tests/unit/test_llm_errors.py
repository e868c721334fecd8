"""LLM provider failures, fallback chains and client reuse, through the real openai client against the fake server.

A provider failure makes the LLM node FAIL (never raise) with the HTTP status and the message on its trace, so
Selector fallbacks and Retry work; clients are shared per (base_url, key, options) on one event loop. Failures
read the same whichever way the call was sent: directly, or through openai-python over either HTTP stack.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tasktree_dist import (
    Context,
    LLMModel,
    LLMProvider,
    Result,
    Status,
    Tree,
    close_llm_clients,
)
from tasktree_dist.core.settings import get_settings
from tasktree_dist.llm.clients import get_llm_client, llm_client_count
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tests.helpers import llm_nodes, user

KEY = "sk-test"
pytestmark = pytest.mark.usefixtures("llm_clients_closed")


@dataclass
class BB:
    text: str = "REPLY:ok"
    key: str = KEY


@pytest.fixture(params=["aiohttp", "httpx"])
def http_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both HTTP stacks under openai-python must report failures the same way."""
    monkeypatch.setattr(get_settings(), "llm_transport", "openai-httpx" if request.param == "httpx" else "openai")
    return request.param


@pytest.fixture(params=["direct", "openai+aiohttp", "openai+httpx"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Non-streaming calls sent directly and through openai-python on both its HTTP stacks must fail the same way
    (streams always go through openai-python, here over aiohttp)."""
    name, _, backend = request.param.partition("+")
    monkeypatch.setattr(get_settings(), "llm_transport", "openai-httpx" if backend == "httpx" else name)
    return name


def sent_by(transport: str, stream: bool = False) -> str:
    """The trace's `transport` attribute for a call: streams always go through openai-python."""
    return "direct" if transport == "direct" and not stream else "openai"


async def run(tree: Tree[Any], bb: Any | None = None) -> tuple[Result, Context]:
    context = Context()
    async with context.using_blackboard(bb if bb is not None else BB()):
        result = await tree(context)  # never raises: provider errors are FAIL results
    return result, context


def closed_port_url() -> str:
    """A base_url on a free port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --------------------------------------------------------------------------- provider errors


@pytest.mark.parametrize(
    ("model", "stream", "status", "error"),
    [
        ("fail-429", False, 429, "RateLimitError: Error code: 429 - Rate limit reached"),
        ("fail-429", True, 429, "RateLimitError: Error code: 429 - Rate limit reached"),
        ("fail-500", False, 500, "InternalServerError: Error code: 500 - Internal server error"),
        ("fail-500", True, 500, "InternalServerError: Error code: 500 - Internal server error"),
        ("malformed", False, None, "JSONDecodeError: Expecting value"),  # direct: MalformedResponseError
        ("malformed", True, None, "JSONDecodeError: Expecting value"),
        ("truncated", True, None, "APIConnectionError: Connection error. (RemoteProtocolError: peer closed"),
        ("truncated", False, None, "APIConnectionError: Connection error. (RemoteProtocolError: peer closed"),
        ("x-fail-500-first-1", False, 500, "InternalServerError: Error code: 500"),
    ],
)
async def test_provider_errors_fail_with_status_and_message(
    fake_llm: ThreadedFakeLLM, transport: str, model: str, stream: bool, status: int | None, error: str
) -> None:
    if model == "malformed" and sent_by(transport, stream) == "direct":
        error = "MalformedResponseError: the HTTP 200 response is not JSON ("
    tree = Tree().LLM(model, user("REPLY:never"), base_url=fake_llm.base_url, api_key=KEY, stream=stream,
                      max_retries=0).End()
    result, context = await run(tree)
    assert result.status is Status.FAIL
    assert result.data is None
    (node,) = llm_nodes(context)
    assert node.result.status is Status.FAIL
    assert node.attributes["model"] == model
    assert node.attributes["transport"] == sent_by(transport, stream)
    assert node.attributes["error"].startswith(error)
    assert node.attributes["error_type"] == error.split(":", 1)[0]
    if status is not None:
        assert node.attributes["status_code"] == status
        assert f"(HTTP {status})" in "\n".join(node.logs)
    else:
        assert "status_code" not in node.attributes
    assert any("[error]" in line and repr(model) in line and error.split(": ", 1)[1] in line for line in node.logs)
    assert "output" not in node.attributes  # nothing was produced
    assert fake_llm.calls == 1
    assert context.trace_root().json()["children"]["Tree"]["children"]["LLM"]["attributes"]["error"].startswith(error)


async def test_truncated_stream_does_not_leak_partial_output(fake_llm: ThreadedFakeLLM, http_backend: str) -> None:
    """A stream cut mid-answer: the deltas seen so far are not a final answer (no finished=True callback)."""
    calls: list[tuple[str, bool]] = []
    tree = Tree().LLM("truncated", user("REPLY:one two three four five six"), base_url=fake_llm.base_url,
                      api_key=KEY, stream=True, max_retries=0,
                      stream_on_delta=lambda b, full, delta, done: calls.append((full, done))).End()
    result, context = await run(tree)
    assert result.status is Status.FAIL
    assert all(done is False for _full, done in calls)
    assert "error" in llm_nodes(context)[0].attributes


async def test_timeout_fails_quickly(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    tree = Tree().LLM("timeout", user("x"), base_url=fake_llm.base_url, api_key=KEY, timeout=0.3,
                      max_retries=0).End()
    started = time.perf_counter()
    result, context = await run(tree)
    assert time.perf_counter() - started < 5.0
    assert result.status is Status.FAIL
    (node,) = llm_nodes(context)
    assert node.attributes["error_type"] == "APITimeoutError"
    assert node.attributes["error"].startswith("APITimeoutError: Request timed out.")
    assert "status_code" not in node.attributes
    assert node.attributes["transport"] == sent_by(transport)


async def test_refused_connection_fails(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    tree = Tree().LLM("fake-gpt", user("x"), base_url=closed_port_url(), api_key=KEY, max_retries=0).End()
    result, context = await run(tree)
    assert result.status is Status.FAIL
    (node,) = llm_nodes(context)
    assert node.attributes["error"].startswith("APIConnectionError: Connection error. (ConnectError: ")
    assert node.attributes["transport"] == sent_by(transport)
    assert fake_llm.calls == 0


async def test_missing_api_key_fails_without_a_request(
    fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tree = Tree().LLM("fake-gpt", user("x"), base_url=fake_llm.base_url, api_key=None).End()
    result, context = await run(tree)
    assert result.status is Status.FAIL
    (node,) = llm_nodes(context)
    assert "API key" in node.attributes["error"] and "OPENAI_API_KEY" in node.attributes["error"]
    assert "api_key" not in node.attributes
    assert fake_llm.calls == 0
    assert llm_client_count() == 0


async def test_api_key_from_a_factory_returning_none_fails_too(
    fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tree = Tree().LLM("fake-gpt", user("x"), base_url=fake_llm.base_url, api_key=lambda b: None).End()
    result, _ = await run(tree)
    assert result.status is Status.FAIL and fake_llm.calls == 0


async def test_openai_api_key_env_is_the_default_key(
    fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like openai-python (and tinytasktree): no key given -> OPENAI_API_KEY, also with a custom base_url."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    tree = Tree().LLM("fake-gpt", user("REPLY:env"), base_url=fake_llm.base_url).End()
    result, _ = await run(tree)
    assert result.status is Status.OK and result.data.final_output == "env"
    get_llm_client(fake_llm.base_url, "sk-from-env")
    assert llm_client_count() == 1


async def test_bad_model_value_fails_the_node(fake_llm: ThreadedFakeLLM) -> None:
    result, context = await run(Tree().LLM(lambda b: "", user("x"), base_url=fake_llm.base_url, api_key=KEY).End())
    assert result.status is Status.FAIL
    assert "model must be" in llm_nodes(context)[0].attributes["error"]
    assert fake_llm.calls == 0


# --------------------------------------------------------------------------- fallback chains


async def test_selector_falls_back_to_a_working_model(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    provider = LLMProvider(base_url=fake_llm.base_url, api_key=KEY, client_kwargs={"max_retries": 0})
    tree = (
        Tree("Fallback")
        .Selector()
        ._().Timeout(5)
        ._()._().LLM(LLMModel("fail-500", provider=provider), user("REPLY:from the backup"))
        ._().Timeout(5)
        ._()._().LLM(LLMModel("fake-gpt", provider=provider), user("REPLY:from the backup"))
        .End()
    )
    result, context = await run(tree)
    assert result.status is Status.OK
    assert result.data.final_output == "from the backup"
    assert fake_llm.calls_per_model == {"fail-500": 1, "fake-gpt": 1}
    failed, succeeded = llm_nodes(context)
    assert failed.attributes["status_code"] == 500 and failed.result.status is Status.FAIL
    assert succeeded.result.status is Status.OK and "error" not in succeeded.attributes


async def test_selector_where_every_model_fails(fake_llm: ThreadedFakeLLM) -> None:
    provider = LLMProvider(base_url=fake_llm.base_url, api_key=KEY, client_kwargs={"max_retries": 0})
    tree = (
        Tree()
        .Selector()
        ._().LLM(LLMModel("fail-500", provider=provider), user("x"))
        ._().LLM(LLMModel("fail-429", provider=provider), user("x"))
        .End()
    )
    result, context = await run(tree)
    assert result.status is Status.FAIL
    assert [n.attributes["status_code"] for n in llm_nodes(context)] == [500, 429]


@pytest.mark.parametrize("via", ["model-name", "header"])
async def test_retry_over_a_rate_limit_that_clears(fake_llm: ThreadedFakeLLM, via: str, transport: str) -> None:
    if via == "model-name":
        model, client_kwargs = "x-fail-429-first-2", {}
    else:
        model = "fake-gpt"
        client_kwargs = {"default_headers": {"X-Fake-Fault": "fail-429", "X-Fake-Fail-Times": "2"}}
    tree = (
        Tree()
        .Retry(max_tries=3)
        ._().LLM(model, user("REPLY:third time lucky"), base_url=fake_llm.base_url, api_key=KEY, max_retries=0,
                 client_kwargs=client_kwargs)
        .End()
    )
    result, context = await run(tree)
    assert result.status is Status.OK and result.data.final_output == "third time lucky"
    assert fake_llm.calls == 3  # Retry did the retrying, one HTTP call per try
    nodes = llm_nodes(context)
    assert [n.result.status for n in nodes] == [Status.FAIL, Status.FAIL, Status.OK]
    assert [n.attributes.get("status_code") for n in nodes] == [429, 429, None]
    assert {n.attributes["transport"] for n in nodes} == {sent_by(transport)}


async def test_retry_gives_up_after_max_tries(fake_llm: ThreadedFakeLLM) -> None:
    tree = (
        Tree()
        .Retry(max_tries=2)
        ._().LLM("x-fail-429-first-5", user("x"), base_url=fake_llm.base_url, api_key=KEY, max_retries=0)
        .End()
    )
    result, _ = await run(tree)
    assert result.status is Status.FAIL and fake_llm.calls == 2


# --------------------------------------------------------------------------- client reuse


async def test_one_client_for_a_gather_of_50_calls(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    fake_llm.set_latency(200)
    doc = Tree[BB]("ReuseDoc").LLM("fake-gpt", lambda b: user(b.text), base_url=fake_llm.base_url,
                                   api_key=lambda b: b.key).End()
    boards = [BB(text=f"REPLY:doc {i}") for i in range(50)]
    gather = Tree[BB]("Reuse50").Gather(lambda b: ([doc] * len(boards), boards), concurrency_limit=50).End()
    result, _ = await run(gather)
    assert result.status is Status.OK
    assert [r.final_output for r in result.data] == [f"doc {i}" for i in range(50)]
    assert fake_llm.calls == 50
    assert fake_llm.max_concurrent >= 20  # the shared client does not serialise the calls
    assert llm_client_count() == 1
    client = get_llm_client(fake_llm.base_url, KEY)
    assert llm_client_count() == 1
    assert not client.is_closed()
    assert await close_llm_clients() == 1
    assert client.is_closed()
    assert llm_client_count() == 0


async def test_different_keys_and_options_make_different_clients(fake_llm: ThreadedFakeLLM) -> None:
    doc = Tree[BB]("KeyedDoc").LLM("fake-gpt", lambda b: user(b.text), base_url=fake_llm.base_url,
                                   api_key=lambda b: b.key).End()
    boards = [BB(key=f"key-{i % 3}") for i in range(9)]
    gather = Tree[BB]("Keyed").Gather(lambda b: ([doc] * len(boards), boards), concurrency_limit=9).End()
    result, _ = await run(gather)
    assert result.status is Status.OK
    assert llm_client_count() == 3
    timeouts = Tree().LLM("fake-gpt", user("x"), base_url=fake_llm.base_url, api_key="key-0", timeout=30).End()
    await run(timeouts)
    assert llm_client_count() == 4  # same key, other client options
    assert await close_llm_clients() == 4


async def test_clients_are_per_event_loop(fake_llm: ThreadedFakeLLM) -> None:
    here = get_llm_client(fake_llm.base_url, KEY)
    assert get_llm_client(fake_llm.base_url, KEY) is here
    other: list[Any] = []

    async def on_another_loop() -> None:
        client = get_llm_client(fake_llm.base_url, KEY)
        other.append(client)
        await close_llm_clients()

    thread = threading.Thread(target=lambda: asyncio.run(on_another_loop()))
    thread.start()
    thread.join(10)
    assert other and other[0] is not here
    assert other[0].is_closed() and not here.is_closed()
    assert llm_client_count() == 1


def test_clients_close_with_their_loop(fake_llm: ThreadedFakeLLM) -> None:
    """A script that never calls close_llm_clients(): asyncio.run closes the loop's clients on its way out."""
    made: list[Any] = []

    async def script() -> Result:
        tree = Tree().LLM("fake-gpt", user("REPLY:bye"), base_url=fake_llm.base_url, api_key="sk-script").End()
        result, _ = await run(tree)
        made.append(get_llm_client(fake_llm.base_url, "sk-script"))
        assert llm_client_count() == 1
        return result

    thread_result: list[Result] = []
    thread = threading.Thread(target=lambda: thread_result.append(asyncio.run(script())))
    thread.start()
    thread.join(10)
    assert thread_result[0].status is Status.OK
    assert made[0].is_closed()
