"""Secrets never shown: a fleet on the TLS Redis with passwords in every URL and a server with tokens runs LLM
batches end to end (one failing), watched through every output an operator sees: the CLI (submit, status, runs,
events, trace, result, workers, audit, metrics targets, an unreachable Redis), the API, the workers' metrics, the
server's and workers' logs, and every value stored in Redis. None holds a password or a token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.redis_server import free_port
from tasktree_dist.testing.secure_redis import SecureRedisServer
from tests.ops_fleet import served, tasktree, wait_for
from tests.secure_fleet import PASSWORDS, role_env, secure_redis, secure_workers

pytestmark = pytest.mark.timeout(180)

BROKER_DB, RUNS_DB = 4, 5
TOKEN = "secret-token-4f1d0c9a7e"
CONTROL = "control-token-93be01d2aa"


@pytest.fixture(scope="module")
def server() -> Iterator[SecureRedisServer]:
    with secure_redis() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(server: SecureRedisServer) -> Iterator[dict[str, Any]]:
    with secure_workers(server, "sec", BROKER_DB, RUNS_DB, concurrency=16, TASKTREE_METRICS_PORT="auto") as workers:
        yield {"env": role_env(server, "coordinator", BROKER_DB, RUNS_DB), "workers": workers}


def secrets(server: SecureRedisServer) -> list[str]:
    return [*PASSWORDS.values(), server.admin_password, TOKEN, CONTROL]


def stored_values(server: SecureRedisServer) -> Iterator[tuple[str, bytes]]:
    """Every key and value of the fleet's databases, whatever its type."""
    for db in (BROKER_DB, RUNS_DB):
        redis = server.admin(db)
        try:
            for key in redis.scan_iter(count=1000):
                kind = redis.type(key).decode()
                if kind == "string":
                    value = redis.get(key) or b""
                elif kind == "hash":
                    value = b"".join(k + v for k, v in redis.hgetall(key).items())
                elif kind == "list":
                    value = b"".join(redis.lrange(key, 0, -1))
                elif kind == "set":
                    value = b"".join(redis.smembers(key))
                elif kind == "zset":
                    value = b"".join(m for m, _ in redis.zrange(key, 0, -1, withscores=True))
                elif kind == "stream":
                    value = b"".join(b"".join(k + v for k, v in fields.items()) for _, fields in redis.xrange(key))
                else:
                    value = b""
                yield key.decode(errors="replace"), value
        finally:
            redis.close()


def test_no_output_of_a_run_shows_a_password_or_a_token(server: SecureRedisServer, fleet: dict[str, Any],
                                                          fake_llm: ThreadedFakeLLM, tmp_path) -> None:
    env = {**fleet["env"], "TASKTREE_IMPORTS": "tests.run_trees"}
    outputs: dict[str, str] = {}

    def cli(name: str, *args: str, **extra: str) -> str:
        done = tasktree({**env, **extra}, *args, timeout=90)
        outputs[name] = done.stdout + done.stderr
        return done.stdout

    board = json.dumps({"base_url": fake_llm.base_url, "texts": ["a", "b", "c"], "models": {"1": "fail-500"}})
    run_id = cli("submit", "submit", "RunBatch", "-b", board, "--wait", "--timeout", "60").strip()
    assert run_id, outputs["submit"]
    cli("status", "status", run_id)
    cli("status-json", "status", run_id, "--json")
    cli("runs", "runs", "--json")
    cli("events", "events", run_id, "--no-follow", "--units", "--json")
    cli("trace", "trace", run_id, "--json")
    cli("result", "result", run_id, "--json")
    cli("workers", "workers", "--json")
    cli("targets", "metrics", "--targets")
    wrong = env["TASKTREE_REDIS_URL"].replace(f":{server.tls_port}/", f":{free_port()}/")
    cli("unreachable", "status", run_id, TASKTREE_REDIS_URL=wrong)
    assert "cannot reach Redis" in outputs["unreachable"]

    serve_env = {**env, "TASKTREE_API_TOKENS": json.dumps([{"name": "ops", "token": TOKEN, "scopes": ["admin"]}]),
                 "TASKTREE_CONTROL_TOKEN": CONTROL}
    with served(serve_env, trace_dir=tmp_path) as url:
        for token in ("a-wrong-guess-12345", CONTROL[:-1]):
            request = urllib.request.Request(url + "/api/runs", headers={"Authorization": f"Bearer {token}"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            outputs[f"refused {token}"] = refused.value.read().decode()
        for path in ("/api/config", "/api/runs", f"/api/runs/{run_id}", f"/api/runs/{run_id}/trace", "/api/audit"):
            request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                outputs[path] = response.read().decode()
        cli("audit", "audit", "--json", "--server", url, TASKTREE_API_TOKEN=TOKEN)
        cli("cancel-remote", "cancel", run_id, "--server", url, TASKTREE_API_TOKEN=CONTROL)
    targets = json.loads(outputs["targets"])
    assert targets, "no worker publishes metrics"
    for group in targets:
        with urllib.request.urlopen(f"http://{group['targets'][0]}/metrics", timeout=10) as response:
            outputs[f"metrics {group['targets'][0]}"] = response.read().decode()
    wait_for(lambda: all("sec" in w.log() for w in fleet["workers"]), "worker logs")
    for worker in fleet["workers"]:
        outputs[f"log {worker.name}"] = worker.log()
    assert "InternalServerError" in outputs["trace"] and json.loads(outputs["/api/audit"])["entries"]

    # the outputs are real: the workers logged their broker (masked), listed themselves, served metrics
    assert all("tasktree-worker:**@" in outputs[f"log {w.name}"] for w in fleet["workers"])
    assert "sec1@" in outputs["workers"] and "tasktree_units" in outputs[next(k for k in outputs if "metrics " in k)]
    found = [(name, secret) for name, text in outputs.items() for secret in secrets(server) if secret in text]
    assert not found, f"secrets shown in: {found}"
    stored = [(key, secret) for key, value in stored_values(server) for secret in secrets(server)
              if secret.encode() in value or secret in key]
    assert not stored, f"secrets stored in Redis: {stored[:10]}"
