"""The gate every request of `tasktree serve` passes before any handler: route (web.routes), origin, rate limit,
token, scope, run labels, and the audit of refused attempts.

Refusals, in the order they are checked:
  404 no declared route / 405 another method           (nothing about tokens is said)
  403 cross-origin (an Origin other than the Host)      (a foreign page cannot act, whatever it carries)
  429 too many failed authentications from this address in the last minute (Retry-After)
  401 no token (tokens configured) or an unknown one    (an unknown one counts as a failure of the address)
  403 the token lacks the route's scope; or, on a server without tokens, anything but reading
  404 the run's labels do not match the token's        (the same answer as a run that does not exist)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from ..runs.audit import AuditLog
from ..tracing.httpserver import Response, json_response
from .routes import PAGE, PLACEHOLDERS, PUBLIC, Route, match
from .tokens import ANONYMOUS, Principal, Scope, TokenSet

#: A stream ticket stands for the token this long: enough for EventSource's reconnects after a short drop; the
#: board asks for a new one when a reconnect is refused.
TICKET_TTL_S = 300.0
_RUN_ID = re.compile(PLACEHOLDERS["run"])
#: Client addresses whose failures are remembered at once (the oldest are forgotten first).
MAX_TRACKED_ADDRESSES = 10_000


def problem(status: int, detail: str) -> Response:
    return json_response({"detail": detail}, status)


@dataclass
class Call:
    """An admitted request: its route, path parameters, query, who made it and from where."""

    route: Route
    params: dict[str, str]
    query: dict[str, str]
    principal: Principal
    address: str
    body: bytes = b""


class FailureLimiter:
    """Failed authentications per client address in a sliding minute; `limit` of them and the address is refused
    (429) until the oldest leaves the window. Guessing a 128-bit token at 10 a minute is hopeless; a typo is not
    locked out for long."""

    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None when it may now."""
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if len(times) < self.limit:
                return None
            return max(0.0, times[0] + self.window_s - now)

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if not times:
                self._failures[address] = times
            times.append(now)
            self._failures.move_to_end(address)
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)


class Tickets:
    """Short-lived signed stand-ins for a token on the live stream (EventSource cannot send headers): bound to one
    run and one token name. Signed with `secret` (TASKTREE_STREAM_TICKET_KEY) when given, so every replica of a
    load-balanced `serve` accepts the others' tickets and a restart keeps them; else with a key made at start (a
    restart voids every ticket, and replicas need sticky sessions)."""

    def __init__(self, ttl_s: float = TICKET_TTL_S, clock: Callable[[], float] = time.time, secret: str = "") -> None:
        # the secret is stretched through HMAC so a short one still gives a full-width key bound to this use
        self._key = (hmac.new(secret.encode(), b"tasktree stream tickets", hashlib.sha256).digest() if secret
                     else os.urandom(32))
        self.ttl_s, self.clock = ttl_s, clock

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def issue(self, name: str, run: str) -> str:
        payload = base64.urlsafe_b64encode(orjson.dumps([name, run, int(self.clock() + self.ttl_s)]))
        return f"{payload.decode()}.{self._sign(payload)}"

    def holder(self, ticket: str, run: str) -> str | None:
        """The token name a valid, unexpired ticket for `run` was issued to, else None."""
        payload, _, signature = ticket.encode().partition(b".")
        if not hmac.compare_digest(self._sign(payload), signature.decode(errors="replace")):
            return None
        try:
            name, for_run, expires = orjson.loads(base64.urlsafe_b64decode(payload))
        except (ValueError, TypeError):
            return None
        return name if for_run == run and expires > self.clock() else None


@dataclass
class Gate:
    """Admits a request to its route or answers the refusal; `run_labels(run_id)` reads a run's labels (None for
    no such run)."""

    tokens: TokenSet
    limiter: FailureLimiter
    run_labels: Callable[[str], Mapping[str, str] | None]
    audit: AuditLog | None = None
    tickets: Tickets = field(default_factory=Tickets)

    def admit(self, method: str, path: str, query: str, headers: Mapping[str, str], address: str) -> Call | Response:
        found = match(method, path)
        if isinstance(found, list):
            if not found:
                return _no_route(path)
            response = problem(405, "Method Not Allowed")
            response.headers["Allow"] = ", ".join([*found, "HEAD"] if "GET" in found else found)
            return response
        route, params = found
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        if route.access in (PUBLIC, PAGE):
            return Call(route, params, args, ANONYMOUS, address)
        refusal = _cross_origin(headers)
        if refusal is not None:
            self._refused(route, params, "unknown", address, refusal)
            return refusal
        principal = self._principal(route, params, args, headers, address)
        if isinstance(principal, Response):
            return principal
        scope = Scope(route.access)
        if not principal.allows(scope):
            if self.tokens:
                refusal = problem(403, f"token {principal.name!r} lacks the {scope.value!r} scope for "
                                       f"{route.method} {route.template}")
            else:
                refusal = problem(403, f"{scope.value} is disabled on this server: it has no tokens (start it with "
                                       "TASKTREE_API_TOKENS, --tokens-file or --control-token)")
            self._refused(route, params, principal.name, address, refusal)
            return refusal
        if route.names_run and principal.labels:
            labels = self.run_labels(params["run"])
            if labels is None or not principal.sees(labels):
                refusal = problem(404, f"no run {params['run']!r}")
                if labels is not None:
                    self._refused(route, params, principal.name, address, refusal, "labels do not match")
                return refusal
        return Call(route, params, args, principal, address)

    def _principal(self, route: Route, params: dict[str, str], args: dict[str, str], headers: Mapping[str, str],
                   address: str) -> Principal | Response:
        if not self.tokens:
            return ANONYMOUS
        wait = self.limiter.retry_after(address)
        if wait is not None:
            refusal = problem(429, "too many failed token attempts from this address: try again in "
                                   f"{wait:.0f} s")
            refusal.headers["Retry-After"] = str(max(1, round(wait)))
            self._refused(route, params, "unknown", address, refusal)
            return refusal
        presented = _bearer(headers)
        if not presented and route.ticket and args.get("ticket"):
            name = self.tickets.holder(args["ticket"], params.get("run", ""))
            principal = self.tokens.by_name(name) if name else None
            if principal is not None:
                return principal
            presented = None
            failure = "stream ticket expired or invalid: ask for a new one (POST .../stream-ticket)"
        elif presented:
            principal = self.tokens.authenticate(presented)
            if principal is not None:
                return principal
            failure = "token not recognised"
        else:
            refusal = _unauthorized("this server needs a token: send Authorization: Bearer <token>")
            if route.access != Scope.READ:
                self._refused(route, params, "anonymous", address, refusal)
            return refusal
        self.limiter.failed(address)
        refusal = _unauthorized(failure)
        self._refused(route, params, "unknown", address, refusal)
        return refusal

    def _refused(self, route: Route, params: Mapping[str, str], who: str, address: str, refusal: Response,
                 detail: str | None = None) -> None:
        if self.audit is None:
            return
        reason = orjson.loads(refusal.body).get("detail", "")
        self.audit.record(who, route.audit or f"{route.method} {route.template}", f"refused {refusal.status}",
                          run=params.get("run"), address=address, detail=detail or reason)

    def record(self, call: Call, response: Response | None, run: str | None = None) -> None:
        """The audit entry of an audited route's answer (an action done, or refused by its handler)."""
        if self.audit is None or call.route.audit is None:
            return
        status = response.status if response is not None else 200
        detail = None
        if response is not None and status >= 400:
            detail = _detail(response)
        self.audit.record(call.principal.name, call.route.audit, "ok" if status < 400 else f"failed {status}",
                          run=run or call.params.get("run"), address=call.address, detail=detail)


def _no_route(path: str) -> Response:
    """404 for a path no route declares (400 for a run id the runs' routes could never match)."""
    if path.startswith("/api/runs/"):
        run_id = path.removeprefix("/api/runs/").partition("/")[0]
        if not _RUN_ID.fullmatch(run_id):
            return problem(400, f"invalid run id in {path[:200]}: use 1-128 letters, digits or '_.:-'")
        return problem(404, f"not found: {path[:200]}")
    if path.startswith("/api/"):
        return problem(404, f"no API route {path[:200]} (see /api/config, /api/runs)")
    return problem(404, f"not found: {path[:200]}")


def _detail(response: Response) -> str | None:
    try:
        found = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return None
    return str(found.get("detail")) if isinstance(found, dict) and found.get("detail") else None


def _bearer(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return (headers.get("X-Tasktree-Token") or "").strip() or None


def _unauthorized(detail: str) -> Response:
    response = problem(401, detail)
    response.headers["WWW-Authenticate"] = 'Bearer realm="tasktree"'
    return response


def _cross_origin(headers: Mapping[str, str]) -> Response | None:
    origin = headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != headers.get("Host", ""):
        return problem(403, f"cross-origin request refused (Origin {origin})")
    if origin == "null":
        return problem(403, "cross-origin request refused (Origin null)")
    return None


def run_id_of(response: Response) -> str | None:
    """The run an answer names (a submit's new run), for its audit entry."""
    try:
        found: Any = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(found, dict):
        for candidate in (found.get("id"), found.get("run_id"), (found.get("status") or {}).get("id")):
            if isinstance(candidate, str):
                return candidate
    return None
