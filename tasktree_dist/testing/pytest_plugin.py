"""Pytest fixtures for the fake OpenAI-compatible LLM server.

Enable with ``pytest_plugins = ["tasktree_dist.testing.pytest_plugin"]`` (in a conftest or test module).

Design: one server per test session (``fake_llm_server``) runs in a background thread on its own
event loop and a free port, so it works from sync tests and from async tests whatever loop
pytest-asyncio gives them, and startup cost is paid once.  The function-scoped ``fake_llm``
fixture hands out the same server after resetting its counters, latency and rate limits, so every test
starts from ``calls == 0``, ``requests == []``, ``max_concurrent == 0`` and zero latency.

The yielded object (:class:`~tasktree_dist.testing.fake_llm.ThreadedFakeLLM`) offers:
``base_url`` ("http://127.0.0.1:PORT/v1"), ``url``, ``calls``, ``requests`` (request bodies),
``request_meta`` (their headers and query), ``calls_per_model``, ``max_concurrent``, ``stats`` (the live
counters), ``reset()`` and ``set_latency(ms, jitter_ms=0)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tasktree_dist.testing.fake_llm import ThreadedFakeLLM


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[ThreadedFakeLLM]:
    """Session-wide fake LLM in a background thread (free port); stopped at session end."""
    server = ThreadedFakeLLM(host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_llm(fake_llm_server: ThreadedFakeLLM) -> Iterator[ThreadedFakeLLM]:
    """The session fake LLM with counters reset, latency set to 0 and no rate limits for this test."""
    fake_llm_server.set_limits()
    fake_llm_server.set_fault(None)
    fake_llm_server.reset()
    fake_llm_server.set_latency(0, 0)
    yield fake_llm_server
    fake_llm_server.set_latency(0, 0)
