"""Shared fixtures: a private redis-server (or REDIS_URL when set), the fake LLM server, the LLM transports."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tasktree_dist.testing.redis_server import RedisServer

pytest_plugins = ["tasktree_dist.testing.pytest_plugin"]

_FOLDER_MARKERS = {"unit": "unit", "fleet": "fleet", "browser": "browser"}


def pytest_configure(config: pytest.Config) -> None:
    """The suite starts a few hundred Python processes (workers, the CLI, examples). Where PYTHONDONTWRITEBYTECODE is
    set (it is on some shared machines), each of them compiled the package from source again; they now share
    bytecode kept outside the source tree (PYTHONPYCACHEPREFIX, per user, reused by later sessions)."""
    if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
        del os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), f"tasktree-pycache-{os.getuid()}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the folder it lives in (unit / fleet / browser), so `-m` selects a loop."""
    for item in items:
        folder = item.path.parent.name
        if folder in _FOLDER_MARKERS:
            item.add_marker(_FOLDER_MARKERS[folder])


@pytest.fixture
async def llm_clients_closed() -> AsyncIterator[None]:
    """Each test runs on its own loop: close the LLM clients it made before that loop goes away."""
    from tasktree_dist import close_llm_clients

    yield
    await close_llm_clients()


@pytest.fixture(params=["direct", "openai"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of sending non-streaming LLM calls (TASKTREE_LLM_TRANSPORT) must behave the same."""
    from tasktree_dist.core.settings import get_settings

    monkeypatch.setattr(get_settings(), "llm_transport", request.param)
    return request.param


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL for the whole session: REDIS_URL when set, else a private server stopped at the end."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def flow_fake() -> Iterator[Any]:
    """The fake LLM server of the flow-control fleet tests, one per session: tests.flow_trees reads its URL
    (FLOW_FAKE_URL) when first imported, so every module using those trees must talk to the same server."""
    from tasktree_dist.testing.fake_llm import ThreadedFakeLLM

    with ThreadedFakeLLM() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[Any]:
    """A private 3-master Redis Cluster for one test module (testing.redis_cluster), stopped by PID."""
    from tasktree_dist.testing.redis_cluster import RedisCluster

    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[object]:
    """A redis.asyncio client on a database flushed before each test."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def fleet(redis_url: str) -> Iterator[dict[str, object]]:
    """Two real `celery -A worker worker` processes (w1, w2) on a private Redis broker; stopped by PID."""
    from tasktree_dist.distributed import create_app
    from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, running_workers
    from tests.helpers import redis_db

    env = fleet_env(redis_db(redis_url, 2), redis_db(redis_url, 3), "tests.dist_trees")
    settings = fleet_settings(env)
    os.environ["TASKTREE_REDIS_URL"] = settings.redis_url  # tests.dist_trees' RedisStore reads it at import
    app = create_app(settings)
    workers = [WorkerProcess("w1", env, queues="tasktree,tasktree.runs,w1"),
               WorkerProcess("w2", env, queues="tasktree,tasktree.runs,w2")]
    with running_workers(app, workers) as names:
        yield {"app": app, "settings": settings, "workers": workers, "names": names, "env": env}
