"""Who may do what, over HTTP against `tasktree serve` in its own process and a real fleet: every route of the
route table x (no token, a token without the scope, another team's token, the right token); label-limited
listing; the audit after each action (stream, run events, `tasktree audit`); failed attempts rate-limited; a
non-loopback server without tokens refuses to start; the CLI with TASKTREE_API_TOKEN against the server."""

from __future__ import annotations

import getpass
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tasktree_dist import RunClient
from tasktree_dist.web.routes import PAGE, PUBLIC, ROUTES
from tasktree_dist.web.tokens import Scope
from tests import run_trees as R
from tests.ops_fleet import ops_fleet, served, tasktree, wait_for

pytestmark = pytest.mark.timeout(180)

SEARCH, ADS, READER, SUBMITTER, ADMIN = (f"{name}-token-0123456789abcdef" for name in
                                         ("search", "ads", "reader", "submitter", "admin"))
TOKENS = [
    {"name": "search", "token": SEARCH, "scopes": ["read", "submit", "signal", "control"],
     "labels": {"team": "search"}},
    {"name": "ads", "token": ADS, "scopes": ["read", "submit", "signal", "control"], "labels": {"team": "ads"}},
    {"name": "reader", "token": READER, "scopes": ["read"]},
    {"name": "submitter", "token": SUBMITTER, "scopes": ["submit"]},
    {"name": "admin", "token": ADMIN, "scopes": ["admin"]},
]


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    with ops_fleet(redis_url, "auth") as fleet:
        fleet["env"] = {**fleet["env"], "TASKTREE_API_TOKENS": json.dumps(TOKENS),
                        "TASKTREE_AUTH_FAILURES_PER_MINUTE": "1000"}
        yield fleet


@pytest.fixture(scope="module")
def server(fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served(fleet["env"], trace_dir=tmp_path_factory.mktemp("traces")) as url:
        yield url


def call(url: str, method: str = "GET", token: str | None = None, body: Any = None, **headers: str) -> tuple[int, Any]:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
    request = urllib.request.Request(url, method=method, headers=headers, data=data)
    try:
        # a retry right after a cancel waits up to 10 s for the run's coordinator to close (RunClient.retry)
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read() if "stream" not in url else response.readline()
            return response.status, json.loads(body) if body.startswith((b"{", b"[")) else body
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def without(scope: Scope) -> str:
    """A token lacking `scope` (and admin)."""
    return SUBMITTER if scope is not Scope.SUBMIT else READER


def test_every_route_needs_its_scope_and_the_runs_labels(fleet: dict[str, Any], server: str) -> None:
    client = RunClient(fleet["app"])
    try:
        mine = client.submit(R.NapsTree, R.Naps(seconds=60, count=1), labels={"team": "search"})
        theirs = client.submit(R.NapsTree, R.Naps(seconds=60, count=1), labels={"team": "ads"})
        wait_for(lambda: client.trace(mine.id), "the run's first trace")
        for route in ROUTES:
            if route.access in (PUBLIC, PAGE):
                continue
            path = (route.template.replace("{run}", mine.id).replace("{name}", "approve")
                    .replace("{trace}", "20240101T000000-abc"))
            url = server + path
            where = f"{route.method} {route.template}"
            assert call(url, route.method)[0] == 401, where
            assert call(url, route.method, "not-a-token")[0] == 401, where
            code, body = call(url, route.method, without(Scope(route.access)))
            assert code == 403 and f"lacks the {route.access.value!r} scope" in body["detail"], where
            if route.names_run:  # another team's token with every scope it needs: the run does not exist
                code, body = call(url, route.method, ADS)
                assert code == 404 and body["detail"] == f"no run {mine.id!r}", where
            if route.method == "GET":
                code, _ = call(url, "GET", ADMIN if route.access is Scope.ADMIN else SEARCH)
                assert code in (200, 404), where  # 404: a saved trace / waits that do not exist here
                if route.template in ("/api/runs/{run}", "/api/runs/{run}/trace", "/api/runs/{run}/stream"):
                    assert code == 200, where
        # the right token: reads and a ticketed stream; another origin is refused whatever it carries
        assert call(f"{server}/api/runs/{mine.id}", token=SEARCH)[1]["labels"] == {"team": "search"}
        code, body = call(f"{server}/api/runs/{mine.id}/stream-ticket", "POST", SEARCH)
        assert code == 200
        assert call(f"{server}/api/runs/{mine.id}/stream?ticket={body['ticket']}")[0] == 200
        assert call(f"{server}/api/runs/{theirs.id}/stream?ticket={body['ticket']}")[0] == 401  # bound to a run
        assert call(f"{server}/api/runs", token=SEARCH, Origin="http://evil.example")[0] == 403
        assert call(f"{server}/api/health") == (200, {"ok": True})
        assert call(f"{server}/runs")[0] == 200  # the page that asks for a token holds no data
        config = call(f"{server}/api/config", token=READER)[1]
        assert config == {"auth": True, "control": False, "signal": False,
                          "token": {"name": "reader", "scopes": ["read"], "labels": {}}}

        # listing: a token with labels lists only runs carrying them
        listed = {run["id"] for run in call(f"{server}/api/runs", token=SEARCH)[1]["runs"]}
        assert mine.id in listed and theirs.id not in listed
        everything = {run["id"] for run in call(f"{server}/api/runs", token=READER)[1]["runs"]}
        assert {mine.id, theirs.id} <= everything
        assert call(f"{server}/traces", token=SEARCH) == (200, [])  # saved traces carry no labels

        # acting: cancel and retry with the right token; theirs is untouched by search
        assert call(f"{server}/api/runs/{theirs.id}/cancel", "POST", SEARCH)[0] == 404
        assert client.status(theirs.id).state.value in ("queued", "running")
        code, body = call(f"{server}/api/runs/{mine.id}/cancel", "POST", SEARCH)
        assert code == 200 and body["status"]["state"] == "cancelled"
        assert call(f"{server}/api/runs/{mine.id}/retry", "POST", SEARCH)[0] == 200
        assert call(f"{server}/api/runs/{mine.id}/cancel", "POST", ADMIN)[0] == 200  # admin: every run
        assert call(f"{server}/api/runs/{theirs.id}/cancel", "POST", ADS)[0] == 200
    finally:
        client.close()


def test_each_action_and_refusal_is_audited(fleet: dict[str, Any], server: str) -> None:
    client = RunClient(fleet["app"])
    env = fleet["env"]
    try:
        run = client.submit(R.NapsTree, R.Naps(seconds=60, count=1), labels={"team": "search"})
        assert call(f"{server}/api/runs/{run.id}/cancel", "POST", READER)[0] == 403
        assert call(f"{server}/api/runs/{run.id}/cancel", "POST", ADS)[0] == 404
        assert call(f"{server}/api/runs/{run.id}/cancel", "POST", "guess-0123456789")[0] == 401
        assert call(f"{server}/api/runs/{run.id}/cancel", "POST", SEARCH)[0] == 200
        assert call(f"{server}/api/runs/{run.id}/retry", "POST", SEARCH)[0] == 200
        assert call(f"{server}/api/runs/{run.id}/cancel", "POST", ADMIN)[0] == 200

        # a submit from Python is audited as the login of the process that made it (RunClient's audit_as)
        expected = [(f"python:{getpass.getuser()}", "submit", "ok"),
                    ("reader", "cancel", "refused 403"), ("ads", "cancel", "refused 404"),
                    ("unknown", "cancel", "refused 401"), ("search", "cancel", "ok"), ("search", "retry", "ok"),
                    ("admin", "cancel", "ok")]
        done = tasktree(env, "audit", "--run", run.id, "--json", "--limit", "20")
        assert done.returncode == 0, done.stderr
        entries = json.loads(done.stdout)[::-1]  # oldest first
        assert [(e["who"], e["action"], e["outcome"]) for e in entries] == expected
        assert entries[0]["address"] == socket.gethostname() and entries[0]["detail"] == "tree RunNaps"
        assert all(e["address"] == "127.0.0.1" and e["run"] == run.id and e["time"] for e in entries[1:])
        assert entries[2]["detail"] == "labels do not match"
        assert "lacks the 'control' scope" in entries[1]["detail"]
        table = tasktree(env, "audit", "--limit", "3")
        assert table.returncode == 0 and "admin" in table.stdout and "cancel" in table.stdout
        # the same entries on the run's own event stream, in order
        audit_events = [e.data for e in client.events_after(run.id, "0", count=10_000) if e.type == "audit"]
        assert [(e["who"], e["action"], e["outcome"]) for e in audit_events] == expected
        # and over HTTP for an admin token (the CLI's --server, with TASKTREE_API_TOKEN)
        remote = tasktree({**env, "TASKTREE_API_TOKEN": ADMIN}, "audit", "--server", server, "--run", run.id, "--json")
        assert remote.returncode == 0 and json.loads(remote.stdout) == json.loads(done.stdout)
        denied = tasktree({**env, "TASKTREE_API_TOKEN": READER}, "audit", "--server", server)
        assert denied.returncode == 2 and "403" in denied.stderr and READER not in denied.stderr + denied.stdout
        # the tasktree command acting straight on Redis is audited too, as the operator's login
        assert tasktree(env, "retry", run.id).returncode == 0
        assert tasktree(env, "cancel", run.id).returncode == 0
        latest = json.loads(tasktree(env, "audit", "--run", run.id, "--json", "--limit", "2").stdout)
        assert [(e["action"], e["outcome"]) for e in latest] == [("cancel", "ok"), ("retry", "ok")]
        assert all(e["who"].startswith("cli:") and e["address"] for e in latest)
    finally:
        client.close()


def test_a_team_token_submits_into_its_team(fleet: dict[str, Any], server: str) -> None:
    request = {"tree": "RunNaps", "blackboard": {"seconds": 0.1, "count": 2}, "labels": {"team": "ads", "x": "1"}}
    assert call(f"{server}/api/runs", "POST", READER, request)[0] == 403
    code, body = call(f"{server}/api/runs", "POST", SEARCH, request)
    assert code == 201, body
    run_id = body["id"]
    client = RunClient(fleet["app"])
    try:
        assert client.status(run_id).labels == {"team": "search", "x": "1"}  # its own label won
        assert client.result(run_id, timeout=60).is_ok()
    finally:
        client.close()
    assert call(f"{server}/api/runs/{run_id}", token=ADS)[0] == 404
    entries = json.loads(tasktree(fleet["env"], "audit", "--run", run_id, "--json").stdout)
    assert [(e["who"], e["action"], e["outcome"]) for e in entries][-1] == ("search", "submit", "ok")


def test_the_cli_acts_through_the_server_with_its_token(fleet: dict[str, Any], server: str) -> None:
    client = RunClient(fleet["app"])
    env = fleet["env"]
    try:
        run = client.submit(R.NapsTree, R.Naps(seconds=60, count=1), labels={"team": "search"})
        missing = tasktree(env, "cancel", run.id, "--server", server)
        assert missing.returncode == 2 and "401" in missing.stderr and "TASKTREE_API_TOKEN" in missing.stderr
        other = tasktree({**env, "TASKTREE_API_TOKEN": ADS}, "cancel", run.id, "--server", server)
        assert other.returncode == 2 and f"no run {run.id!r}" in other.stderr
        done = tasktree({**env, "TASKTREE_API_TOKEN": SEARCH}, "cancel", run.id, "--server", server)
        assert done.returncode == 0 and "cancelled" in done.stdout
        again = tasktree({**env, "TASKTREE_API_TOKEN": SEARCH}, "cancel", run.id, "--server", server)
        assert again.returncode == 1 and "409" in again.stderr
        assert client.status(run.id).state.value == "cancelled"
        assert tasktree({**env, "TASKTREE_API_TOKEN": SEARCH}, "retry", run.id, "--server", server).returncode == 0
        client.cancel(run.id)
    finally:
        client.close()


def test_failed_attempts_are_rate_limited_per_address(fleet: dict[str, Any]) -> None:
    env = {**fleet["env"], "TASKTREE_AUTH_FAILURES_PER_MINUTE": "3"}
    with served(env) as url:
        for _ in range(3):
            assert call(f"{url}/api/runs", token="guess-0123456789")[0] == 401
        code, body = call(f"{url}/api/runs", token=READER)  # even the right token, from this address, for now
        assert code == 429 and "too many failed token attempts" in body["detail"]
        assert call(f"{url}/api/health")[0] == 200


def test_a_public_address_without_tokens_refuses_to_start(fleet: dict[str, Any]) -> None:
    env = {k: v for k, v in fleet["env"].items() if k not in ("TASKTREE_API_TOKENS", "TASKTREE_CONTROL_TOKEN")}
    done = tasktree(env, "serve", "--host", "0.0.0.0", "--port", "0", timeout=30)
    assert done.returncode == 2 and "without tokens" in done.stderr and "--insecure-open" in done.stderr
    bad = tasktree({**env, "TASKTREE_API_TOKENS": '[{"name": "x", "scopes": ["read"]}]'}, "serve", "--port", "0")
    assert bad.returncode == 2 and "TASKTREE_API_TOKENS: token #0 (x)" in bad.stderr


def test_a_server_without_tokens_reads_but_does_nothing_else(fleet: dict[str, Any]) -> None:
    env = {k: v for k, v in fleet["env"].items() if k != "TASKTREE_API_TOKENS"}
    client = RunClient(fleet["app"])
    try:
        run = client.submit(R.NapsTree, R.Naps(seconds=60, count=1))
        with served(env) as url:
            assert call(f"{url}/api/runs/{run.id}")[0] == 200
            assert call(f"{url}/api/config")[1] == {"auth": False, "control": False, "signal": False, "token": None}
            code, body = call(f"{url}/api/runs/{run.id}/cancel", "POST", SEARCH)
            assert code == 403 and "no tokens" in body["detail"]
            assert orjson.loads(orjson.dumps(call(f"{url}/api/audit")))[0] == 403
        client.cancel(run.id)
    finally:
        client.close()
