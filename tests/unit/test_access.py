"""Tokens, the route table and the gate, without a server: parsing and its errors, constant-time lookup by digest,
scopes and labels, the failure limiter, stream tickets, and that every route declares its access."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from tasktree_dist.web.access import FailureLimiter, Gate, Tickets
from tasktree_dist.web.routes import PAGE, PUBLIC, ROUTES, Route, match
from tasktree_dist.web.tokens import Scope, TokenConfigError, TokenSet, parse_tokens

SEARCH = "search-token-0123456789abcdef"
ADS = "ads-token-0123456789abcdef0123"
TOKENS = orjson.dumps([
    {"name": "search", "token": SEARCH, "scopes": ["read", "control"], "labels": {"team": "search"}},
    {"name": "ads-ro", "sha256": hashlib.sha256(ADS.encode()).hexdigest(), "scopes": ["read"]},
]).decode()


def test_tokens_are_kept_as_digests_and_found_by_them() -> None:
    tokens = TokenSet.configured(TOKENS, control_token="ctl")
    assert tokens.names() == ["search", "ads-ro", "control"]
    search = tokens.authenticate(SEARCH)
    assert search is not None and search.name == "search" and search.allows(Scope.CONTROL)
    assert not search.allows(Scope.SUBMIT) and search.labels == {"team": "search"}
    assert tokens.authenticate(ADS).name == "ads-ro"  # configured by its sha256 only
    assert tokens.authenticate("ctl").allows(Scope.SUBMIT)  # the control token: every scope
    assert tokens.authenticate(SEARCH[:-1]) is None and tokens.authenticate("") is None
    assert SEARCH not in repr(vars(tokens))  # only digests are held


@pytest.mark.parametrize(("text", "message"), [
    ("{", "not JSON"),
    ('{"name": "x"}', "must be a JSON list"),
    ('[{"name": "a", "scopes": ["read"]}]', "token #0 (a): give exactly one of `token` and `sha256`"),
    ('[{"name": "a", "token": "0123456789abcdef", "scopes": ["root"]}]', "token #0 (a): scopes.0"),
    ('[{"name": "a", "sha256": "xyz", "scopes": ["read"]}]', "64 hex digits"),
    ('[{"name": "a", "token": "short", "scopes": ["read"]}]', "token #0 (a): token"),
    ('[{"name": "a", "token": "0123456789abcdef", "scopes": ["read"], "lables": {}}]', "lables"),
])
def test_malformed_tokens_are_named(text: str, message: str) -> None:
    with pytest.raises(TokenConfigError, match="TASKTREE_API_TOKENS") as refused:
        parse_tokens(text, "TASKTREE_API_TOKENS")
    assert message in str(refused.value)


def test_duplicate_names_and_tokens_are_refused(tmp_path) -> None:
    twice = '[{"name": "a", "token": "0123456789abcdef", "scopes": ["read"]}]'
    with pytest.raises(TokenConfigError, match="named 'a'"):
        TokenSet.configured(twice, tokens_file=str(_write(tmp_path, twice)))
    other = '[{"name": "b", "token": "0123456789abcdef", "scopes": ["read"]}]'
    with pytest.raises(TokenConfigError, match="same token"):
        TokenSet.configured(twice, tokens_file=str(_write(tmp_path, other)))
    with pytest.raises(TokenConfigError, match="tokens file .*missing"):
        TokenSet.configured(tokens_file=str(tmp_path / "missing"))


def _write(tmp_path, text: str):
    path = tmp_path / "tokens.json"
    path.write_text(text)
    return path


def test_labels_limit_what_a_token_sees_and_stamp_what_it_submits() -> None:
    search = TokenSet.configured(TOKENS).authenticate(SEARCH)
    assert search.sees({"team": "search", "env": "prod"}) and not search.sees({"team": "ads"})
    assert not search.sees({}) and not search.sees(None)
    assert search.stamp({"team": "ads", "env": "dev"}) == {"team": "search", "env": "dev"}


def test_every_route_declares_its_access_and_undeclared_paths_match_nothing() -> None:
    for route in ROUTES:
        assert route.access in (*Scope, PUBLIC, PAGE), route
        assert route.handler.startswith("route_")
    assert [r.template for r in ROUTES if r.access == PUBLIC] == ["/api/health"]
    with pytest.raises(TypeError):
        Route("GET", "/api/new", "route_new")  # type: ignore[call-arg]  # no access: cannot be declared
    assert match("GET", "/api/runs/r1/secrets") == []  # not declared: 404, never a handler
    assert match("GET", "/api/anything") == []
    assert match("POST", "/api/runs/r1/trace") == ["GET"]
    assert match("POST", "/traces") == ["GET"]
    route, params = match("POST", "/api/runs/r-1.2/signals/approve")
    assert route.access is Scope.SIGNAL and params == {"run": "r-1.2", "name": "approve"}
    assert match("HEAD", "/runs/abc")[0].access == PAGE
    for bad in ("/api/runs/..%2F/trace", "/api/runs/%2e%2e/trace", "/api/runs/a b"):
        assert match("GET", bad) == [], bad


def test_the_limiter_refuses_an_address_after_n_failures_in_a_minute() -> None:
    now = [1000.0]
    limiter = FailureLimiter(3, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(60.0)
    assert limiter.retry_after("10.0.0.2") is None  # per address
    now[0] += 60.5
    assert limiter.retry_after("10.0.0.1") is None


def test_stream_tickets_are_bound_to_a_run_and_expire() -> None:
    now = [1000.0]
    tickets = Tickets(ttl_s=300, clock=lambda: now[0])
    ticket = tickets.issue("search", "run-1")
    assert tickets.holder(ticket, "run-1") == "search"
    assert tickets.holder(ticket, "run-2") is None
    payload, _, signature = ticket.partition(".")
    assert tickets.holder(payload + "." + "0" * len(signature), "run-1") is None
    assert Tickets().holder(ticket, "run-1") is None  # another server's key
    now[0] += 301
    assert tickets.holder(ticket, "run-1") is None


def test_the_gate_checks_scope_and_labels_before_any_handler() -> None:
    tokens = TokenSet.configured(TOKENS)
    runs = {"mine": {"team": "search"}, "theirs": {"team": "ads"}}
    gate = Gate(tokens, FailureLimiter(2), runs.get)

    def admit(method: str, path: str, token: str | None = None, address: str = "10.1.1.1", **headers: str):
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return gate.admit(method, path, "", {"Host": "board:8000", **headers}, address)

    assert admit("GET", "/api/health").principal.name == "anonymous"
    assert admit("GET", "/api/runs").status == 401
    assert admit("GET", "/api/runs/mine", SEARCH).principal.name == "search"
    assert admit("GET", "/api/runs/theirs", SEARCH).status == 404  # as if it did not exist
    assert admit("GET", "/api/runs/nope", SEARCH).status == 404
    assert admit("GET", "/api/runs/theirs", ADS).principal.name == "ads-ro"  # no labels: every run
    assert admit("POST", "/api/runs/theirs/cancel", ADS).status == 403
    assert admit("POST", "/api/runs/mine/cancel", SEARCH, Origin="http://evil.example").status == 403
    assert admit("GET", "/api/audit", SEARCH).status == 403
    assert admit("GET", "/api/runs", "wrong-1", address="10.9.9.9").status == 401
    assert admit("GET", "/api/runs", "wrong-2", address="10.9.9.9").status == 401
    limited = admit("GET", "/api/runs", SEARCH, address="10.9.9.9")
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert admit("GET", "/api/runs", SEARCH).principal.name == "search"  # other addresses unaffected

    open_gate = Gate(TokenSet(), FailureLimiter(2), runs.get)
    assert open_gate.admit("GET", "/api/runs", "", {}, "127.0.0.1").principal.name == "anonymous"
    refused = open_gate.admit("POST", "/api/runs/mine/cancel", "", {"Authorization": "Bearer x"}, "127.0.0.1")
    assert refused.status == 403 and "no tokens" in orjson.loads(refused.body)["detail"]


def test_replicas_sharing_a_ticket_key_accept_each_others_tickets() -> None:
    """Several `serve` replicas behind one address: a ticket one issued opens the stream on another (and after a
    restart) when they share TASKTREE_STREAM_TICKET_KEY; another key, or none, refuses it."""
    ticket = Tickets(secret="s3cret").issue("search", "run-1")
    assert Tickets(secret="s3cret").holder(ticket, "run-1") == "search"
    assert Tickets(secret="other").holder(ticket, "run-1") is None
    assert Tickets().holder(ticket, "run-1") is None
