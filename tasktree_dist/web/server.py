"""`tasktree serve`: the runs board, its JSON API, the live stream of each run and the saved traces, every route
behind one gate (web.access) that checks the route's declared scope (web.routes) before any handler runs.

The stream is server-sent events: each event of the run's Redis stream becomes `id:`/`event:`/`data:` (the browser's
EventSource resumes from Last-Event-ID after a drop); `event: end` once the run finished and everything was sent.
EventSource cannot send an Authorization header, so the board first asks `POST /api/runs/{id}/stream-ticket` (with
its token) and opens the stream with `?ticket=`: a signed, five-minute stand-in bound to that run and token name.
A request from another origin is refused whatever it carries; no CORS is served.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import time
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import orjson
from redis.exceptions import RedisError

from ..core.log import logger
from ..runs.audit import AuditLog
from ..runs.client import RunClient
from ..runs.model import RunNotFoundError, RunState
from ..tracing.httpserver import (
    DEFAULT_TRACE_DIR,
    SECURITY_HEADERS,
    Response,
    TraceRequestHandler,
    create_http_app,
    is_loopback,
    json_response,
    packaged_ui,
    serve_until_stopped,
    ui_response,
)
from .access import Call, FailureLimiter, Gate, Tickets, problem, run_id_of
from .api import RunsAPI
from .tokens import Scope, TokenSet, describe

_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
#: A comment line this often keeps proxies and the browser from closing a quiet stream.
KEEPALIVE_S = 15.0
#: Events per read from Redis, and how long one read waits for new ones.
STREAM_BATCH, STREAM_BLOCK_MS = 200, 1000
#: A stream ends after this long (the browser reconnects with Last-Event-ID): no thread is held forever.
STREAM_MAX_S = 3600.0
DEFAULT_FAILURES_PER_MINUTE = 10


class InsecureServerError(RuntimeError):
    """`tasktree serve` on a non-loopback address without tokens (every run readable by anyone who reaches it)."""


class RunsRequestHandler(TraceRequestHandler):
    api: ClassVar[RunsAPI]
    gate: ClassVar[Gate]

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            length = max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.close_connection = True
            self._send(problem(400, "Content-Length must be an integer"))
            return
        try:
            admitted = self.gate.admit(method, url.path, url.query, self.headers, self.client_address[0])
        except (RedisError, OSError):  # a label check could not read the run
            logger.exception("runs API %s: the gate could not read Redis", url.path)
            admitted = problem(503, "runs are unavailable: cannot read Redis (TASKTREE_REDIS_URL)")
        if isinstance(admitted, Response):
            self.close_connection = self.close_connection or length > 0  # its body is left unread
            self._send(admitted, body=method != "HEAD")
            return
        if length > admitted.route.max_body:
            self.close_connection = True
            self._send(problem(413, "request body too large"))
            return
        admitted.body = self.rfile.read(length) if length else b""
        handler = getattr(self, admitted.route.handler, None)
        response: Response | None
        try:
            response = handler(admitted) if handler is not None else _not_served(admitted)
        except (RedisError, OSError):  # Redis away and the like: answered, and logged here
            logger.exception("runs API %s failed", url.path)
            response = problem(503, "runs are unavailable: cannot read Redis (TASKTREE_REDIS_URL)")
        except RunNotFoundError as exc:
            response = problem(404, str(exc))
        except Exception:  # noqa: BLE001 - a request must not take the thread down unanswered
            logger.exception("runs server: %s %s failed", method, url.path)
            response = problem(500, "internal error")
        if admitted.route.audit is not None:
            self.gate.record(admitted, response, run_id_of(response) if response is not None else None)
        if response is not None:
            self._send(response, body=method != "HEAD")

    # -- routes (web.routes.ROUTES names them) --------------------------------------------------------------------
    def route_health(self, call: Call) -> Response:
        return json_response({"ok": True})

    def route_config(self, call: Call) -> Response:
        tokens = bool(self.gate.tokens)
        return json_response({"auth": tokens, "control": tokens and call.principal.allows(Scope.CONTROL),
                              "signal": tokens and call.principal.allows(Scope.SIGNAL),
                              "token": describe(call.principal) if tokens else None})

    def route_runs(self, call: Call) -> Response:
        return self.api.list(call.query, call.principal.labels)

    def route_run(self, call: Call) -> Response:
        return self.api.status(call.params["run"])

    def route_run_trace(self, call: Call) -> Response:
        return self.api.trace(call.params["run"])

    def route_run_trace_children(self, call: Call) -> Response:
        return self.api.children(call.params["run"], call.query)

    def route_cancel(self, call: Call) -> Response:
        return self.api.act(call.params["run"], "cancel")

    def route_retry(self, call: Call) -> Response:
        return self.api.act(call.params["run"], "retry")

    def route_submit(self, call: Call) -> Response:
        if call.principal.labels:  # a team's token submits into its team's runs: its labels win
            try:
                request = orjson.loads(call.body or b"{}")
            except orjson.JSONDecodeError as exc:
                return problem(400, f"the body is not JSON: {exc}")
            if isinstance(request, dict):
                labels = request.get("labels")
                request["labels"] = call.principal.stamp(labels if isinstance(labels, dict) else None)
                call.body = orjson.dumps(request)
        return self.api.submit(call.body)

    def route_signal(self, call: Call) -> Response:
        return self.api.signal(call.params["run"], call.params["name"], urlsplit(self.path).query, call.body)

    def route_run_waits(self, call: Call) -> Response:
        return json_response({"waits": [wait.json() for wait in self.api.client.waits(call.params["run"])]})

    def route_run_tree(self, call: Call) -> Response:
        self.api.client.status(call.params["run"])  # an unknown run: 404
        found = self.api.client.spec(call.params["run"])
        return json_response(found) if found is not None else problem(404, "this run was not submitted as a spec")

    def route_stream_ticket(self, call: Call) -> Response:
        self.api.client.status(call.params["run"])  # an unknown run: 404 below
        return json_response({"ticket": self.gate.tickets.issue(call.principal.name, call.params["run"])})

    def route_audit(self, call: Call) -> Response:
        if self.gate.audit is None:
            return problem(404, "this server keeps no audit")
        try:
            limit = min(max(int(call.query.get("limit", "100")), 1), 10_000)
        except ValueError:
            return problem(400, "limit must be an integer")
        entries = self.gate.audit.entries(limit, call.query.get("run") or None)
        return json_response({"entries": [entry.to_json() for entry in entries]})

    def route_saved_traces(self, call: Call) -> Response:
        if call.principal.labels:  # saved trace files carry no labels: a token limited to some runs sees none
            return json_response([])
        return self._list(urlsplit(self.path).query)

    def route_saved_trace(self, call: Call) -> Response:
        trace_id = unquote(call.params["trace"])
        if call.principal.labels:
            return problem(404, f"Trace not found: {trace_id}")
        return self._trace(trace_id)

    def route_page(self, call: Call) -> Response:
        path = urlsplit(self.path).path
        if path == "/runs" or path.startswith("/runs/"):
            found = ui_response(packaged_ui(), "/")  # the viewer's runs pages (ids may hold dots)
        else:
            found = ui_response(self.ui_root, path) if self.ui_root is not None else None
        return found or problem(404, f"not found: {path}")

    # -- the live stream ------------------------------------------------------------------------------------------
    def route_run_stream(self, call: Call) -> Response | None:
        run_id = call.params["run"]
        after = self.headers.get("Last-Event-ID") or call.query.get("after", "0")
        if not _STREAM_ID.fullmatch(after):
            return problem(400, "after / Last-Event-ID must be a stream id like 1700000000000-0")
        client = self.api.client
        try:
            client.status(run_id)
        except RunNotFoundError as exc:
            return problem(404, str(exc))
        self.close_connection = True
        self.send_response(200)
        for name, value in {**SECURITY_HEADERS, "Content-Type": "text/event-stream; charset=utf-8",
                            "Cache-Control": "no-store", "Connection": "close", "X-Accel-Buffering": "no"}.items():
            self.send_header(name, value)
        self.end_headers()
        started = last_write = time.monotonic()
        try:
            self._write(": stream of run " + run_id + "\nretry: 2000\n\n")
            while time.monotonic() - started < STREAM_MAX_S:
                events = client.events_after(run_id, after, block_ms=STREAM_BLOCK_MS, count=STREAM_BATCH)
                for event in events:
                    after = event.id
                    data = json.dumps({"type": event.type, "data": event.data, "time": event.time.isoformat()},
                                      default=str)
                    self._write(f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n")
                    last_write = time.monotonic()
                if events:
                    continue
                if RunState(client.status(run_id).state).finished and not client.events_after(run_id, after):
                    self._write("event: end\ndata: {}\n\n")
                    return None
                if time.monotonic() - last_write > KEEPALIVE_S:
                    self._write(": keep-alive\n\n")
                    last_write = time.monotonic()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            return None  # the browser went away
        except Exception:  # noqa: BLE001 - Redis trouble: end the stream, the browser reconnects
            logger.exception("stream of run %s failed", run_id)
        return None

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode("utf-8"))
        self.wfile.flush()


def _not_served(call: Call) -> Response:
    """A declared route (so guarded) that this version does not serve."""
    return problem(404, f"not served here: {call.route.method} {call.route.template}")


def create_runs_app(client: RunClient, trace_dir: str | os.PathLike[str] = DEFAULT_TRACE_DIR,
                    control_token: str | None = None, tokens: TokenSet | None = None,
                    audit: AuditLog | None = None,
                    failures_per_minute: int = DEFAULT_FAILURES_PER_MINUTE,
                    ticket_key: str = "") -> type[RunsRequestHandler]:
    """The handler class: the trace server's for `trace_dir`, plus runs read through `client`, every route behind
    a gate over `tokens` (and `control_token`, a token with every scope); refusals and actions go to `audit`."""
    base = create_http_app(trace_dir)
    client.audit_as = None  # the gate audits each action under its caller's token name, not the server's login
    token_set = tokens if tokens is not None else TokenSet()
    if control_token:
        token_set = TokenSet.merged(token_set, TokenSet.configured(control_token=control_token))
    api = RunsAPI(client)
    gate = Gate(token_set, FailureLimiter(failures_per_minute), api.run_labels, audit, Tickets(secret=ticket_key))
    attributes = {"storage": base.storage, "ui_root": base.ui_root, "api": api, "gate": gate}
    return type("RunsRequestHandler", (RunsRequestHandler,), attributes)


def run_server(client: RunClient, host: str = "127.0.0.1", port: int = 8000,
               trace_dir: str | os.PathLike[str] = DEFAULT_TRACE_DIR, control_token: str | None = None,
               tokens: TokenSet | None = None, insecure_open: bool = False) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM). 127.0.0.1 by default: runs hold prompts and outputs; another
    address needs tokens (or `insecure_open`)."""
    settings = client.settings
    token_set = tokens if tokens is not None else TokenSet()
    if control_token:
        token_set = TokenSet.merged(token_set, TokenSet.configured(control_token=control_token))
    if not token_set and not is_loopback(host) and not insecure_open:
        raise InsecureServerError(
            f"refusing to serve runs on {host} without tokens: anyone reaching it could read every run. Configure "
            "TASKTREE_API_TOKENS (or --tokens-file / --control-token), bind 127.0.0.1, or pass --insecure-open")
    audit = AuditLog.from_settings(settings)
    handler = create_runs_app(client, trace_dir, tokens=token_set, audit=audit,
                              failures_per_minute=settings.auth_failures_per_minute,
                              ticket_key=settings.stream_ticket_key)
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # open event streams do not hold the exit
    access = (f"{len(token_set)} token(s): {', '.join(token_set.names())}" if token_set
              else "no tokens: reads open, no cancel/retry/submit")
    try:
        serve_until_stopped(server, "runs", lambda url: (
            f"tasktree runs board on {url}/runs (traces from {handler.storage.directory}; {access}; Ctrl-C to stop)"))
    finally:
        audit.close()
        client.close()
