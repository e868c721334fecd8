"""`tasktree serve`: the trace server (tracing.httpserver: its routes, headers and UI, unchanged) plus the runs API
(web.api), a live stream per run and token-guarded control.

The stream is server-sent events: each event of the run's Redis stream becomes `id:`/`event:`/`data:` (the browser's
EventSource resumes from Last-Event-ID after a drop); `event: end` once the run finished and everything was sent.
Control (POST cancel/retry, and POST /api/runs to submit a run) is refused unless the server was started with a
token, and then needs it in `Authorization: Bearer <token>` (or `X-Tasktree-Token`); a request from another origin
is refused whatever it carries. A browser can only send such headers to this origin (no CORS is served), so a
foreign page cannot act.
"""

from __future__ import annotations

import hmac
import http.server
import json
import os
import re
import time
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

from ..core.log import logger
from ..runs.client import RunClient
from ..runs.model import RunNotFoundError, RunState
from ..tracing.httpserver import (
    DEFAULT_TRACE_DIR,
    SECURITY_HEADERS,
    Response,
    TraceRequestHandler,
    create_http_app,
    packaged_ui,
    serve_until_stopped,
    ui_response,
)
from .api import Route, RunsAPI, problem

_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
#: A comment line this often keeps proxies and the browser from closing a quiet stream.
KEEPALIVE_S = 15.0
#: Events per read from Redis, and how long one read waits for new ones.
STREAM_BATCH, STREAM_BLOCK_MS = 200, 1000
#: A stream ends after this long (the browser reconnects with Last-Event-ID): no thread is held forever.
STREAM_MAX_S = 3600.0
MAX_POST_BODY = 64 * 1024
#: A submitted run: a spec document (at most 1 MB: builder.spec_source) plus its blackboard.
MAX_SUBMIT_BODY = 4 * 1024 * 1024


class RunsRequestHandler(TraceRequestHandler):
    api: ClassVar[RunsAPI]
    control_token: ClassVar[str | None]

    # -- GET ------------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        url = urlsplit(self.path)
        route = Route.parse(url.path) if url.path.startswith("/api/runs/") else None
        if route is not None and route.action == "stream":
            self._stream(route.run_id, url.query)
        else:
            super().do_GET()

    def _respond(self) -> Response:
        url = urlsplit(self.path)
        if url.path == "/api/config" or url.path == "/api/runs" or url.path.startswith("/api/runs/"):
            try:
                return self.api.get(url.path, url.query)
            except Exception:  # noqa: BLE001 - Redis away and the like: answered, and logged here
                logger.exception("runs API %s failed", url.path)
                return problem(503, "runs are unavailable: cannot read Redis (TASKTREE_REDIS_URL)")
        if url.path.startswith("/api/"):  # not the viewer's page: an API client gets JSON
            return problem(404, f"no API route {url.path[:200]} (see /api/config, /api/runs)")
        if url.path == "/runs" or url.path.startswith("/runs/"):
            found = ui_response(packaged_ui(), "/")  # the viewer's runs pages (ids may hold dots)
            if found is not None:
                return found
        return super()._respond()

    # -- POST (control) -------------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        submitting = url.path.rstrip("/") == "/api/runs"
        if not submitting and not url.path.startswith("/api/runs/"):
            self._not_allowed()
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > (MAX_SUBMIT_BODY if submitting else MAX_POST_BODY):
            self.close_connection = True
            self._send(problem(413, "request body too large"))
            return
        body = self.rfile.read(length)  # a submitted run, a signal's payload; other actions are all in the path
        refusal = self._refusal()
        if refusal is not None:
            self._send(refusal)
        else:
            self._send(self.api.submit(body) if submitting else self.api.act(url.path, body, url.query))

    def _refusal(self) -> Response | None:
        if not self.control_token:
            return problem(403, "control actions are disabled on this server: start it with --control-token "
                                "(or TASKTREE_CONTROL_TOKEN) to allow cancel, retry and signals")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host", ""):
            return problem(403, f"cross-origin control request refused (Origin {origin})")
        given = self.headers.get("X-Tasktree-Token") or ""
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), self.control_token.encode()):
            response = problem(401, "missing or wrong control token")
            response.headers["WWW-Authenticate"] = 'Bearer realm="tasktree"'
            return response
        return None

    # -- the live stream ------------------------------------------------------------------------------------------
    def _stream(self, run_id: str, query: str) -> None:
        after = self.headers.get("Last-Event-ID") or parse_qs(query).get("after", ["0"])[-1]
        if not _STREAM_ID.fullmatch(after):
            self._send(problem(400, "after / Last-Event-ID must be a stream id like 1700000000000-0"))
            return
        client = self.api.client
        try:
            client.status(run_id)
        except RunNotFoundError as exc:
            self._send(problem(404, str(exc)))
            return
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
                    return
                if time.monotonic() - last_write > KEEPALIVE_S:
                    self._write(": keep-alive\n\n")
                    last_write = time.monotonic()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            return  # the browser went away
        except Exception:  # noqa: BLE001 - Redis trouble: end the stream, the browser reconnects
            logger.exception("stream of run %s failed", run_id)

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode("utf-8"))
        self.wfile.flush()


def create_runs_app(client: RunClient, trace_dir: str | os.PathLike[str] = DEFAULT_TRACE_DIR,
                    control_token: str | None = None) -> type[RunsRequestHandler]:
    """The handler class: the trace server's for `trace_dir`, plus runs read through `client`."""
    base = create_http_app(trace_dir)
    attributes = {"storage": base.storage, "ui_root": base.ui_root, "api": RunsAPI(client, bool(control_token)),
                  "control_token": control_token or None}
    return type("RunsRequestHandler", (RunsRequestHandler,), attributes)


def run_server(client: RunClient, host: str = "127.0.0.1", port: int = 8000,
               trace_dir: str | os.PathLike[str] = DEFAULT_TRACE_DIR, control_token: str | None = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM). 127.0.0.1 by default: runs hold prompts and outputs."""
    handler = create_runs_app(client, trace_dir, control_token)
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # open event streams do not hold the exit
    control = "enabled (token required)" if control_token else "disabled (no --control-token)"
    try:
        serve_until_stopped(server, "runs", lambda url: (
            f"tasktree runs board on {url}/runs (traces from {handler.storage.directory}; cancel/retry {control}; "
            "Ctrl-C to stop)"))
    finally:
        client.close()
