"""The trace server: a small read-only HTTP API over a trace directory, plus the packaged trace viewer.

Routes (GET only):

- ``/traces?limit=N``  saved traces, newest first (``[{"id", "name", "created_at", "tree"}]``, default limit 100)
- ``/trace/{id}``      one trace's JSON (400 for an invalid id, 404 for a missing one)
- ``/`` and ``/{id}``  the viewer (one self-contained HTML file shipped with the package)

Every id is checked against the storage's id pattern before any file system access, so no request can name a
file outside the trace directory, and the only file served from disk besides traces is the packaged viewer.
Traces can hold prompts, LLM output and tool data: the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from .storage import FileTraceStorageHandler, InvalidTraceIdError, validate_trace_id

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_TRACE_DIR = ".traces"
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000

#: Inline script and style from the page itself, fetches to the same origin, nothing else (no frames, no forms,
#: no external images or fonts). Trace text is only ever put in the page as text nodes, never as markup.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

STORAGE_KEY = web.AppKey("tasktree_trace_storage", FileTraceStorageHandler)
VIEWER_KEY = web.AppKey("tasktree_viewer_html", bytes)


def viewer_html() -> bytes:
    """The packaged viewer page (tasktree_dist/tracing/ui/index.html)."""
    return resources.files("tasktree_dist.tracing").joinpath("ui", "index.html").read_bytes()


def _json(data: Any, status: int = 200) -> web.Response:
    body = json.dumps(data, ensure_ascii=False, default=str)
    return web.Response(
        text=body, status=status, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def _error(status: int, detail: str) -> web.Response:
    return _json({"detail": detail}, status=status)


def _is_trace_id(value: str) -> bool:
    try:
        validate_trace_id(value)
    except InvalidTraceIdError:
        return False
    return True


async def _list_traces(request: web.Request) -> web.Response:
    raw = request.query.get("limit")
    limit = DEFAULT_LIST_LIMIT
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            return _error(400, "limit must be an integer")
        if limit < 0:
            return _error(400, "limit must be >= 0")
        limit = min(limit, MAX_LIST_LIMIT)
    return _json(await request.app[STORAGE_KEY].list_traces(limit=limit))


async def _get_trace(request: web.Request) -> web.Response:
    trace_id = request.match_info["trace_id"]
    if not _is_trace_id(trace_id):
        return _error(400, "Invalid trace id")
    try:
        trace = await request.app[STORAGE_KEY].query(trace_id)
    except InvalidTraceIdError:
        return _error(400, "Invalid trace id")
    except FileNotFoundError:
        return _error(404, f"Trace not found: {trace_id}")
    except (OSError, ValueError):  # unreadable or corrupt file
        return _error(500, f"Trace could not be read: {trace_id}")
    return _json(trace)


def _viewer_response(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[VIEWER_KEY], content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"}
    )


async def _viewer_index(request: web.Request) -> web.Response:
    return _viewer_response(request)


async def _viewer_trace(request: web.Request) -> web.Response:
    if not _is_trace_id(request.match_info["trace_id"]):
        return _error(404, "Not Found")
    return _viewer_response(request)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    """Router errors (unknown path, wrong method) answer with the same {"detail"} JSON as the API."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def create_http_app(trace_dir: str | os.PathLike[str] = DEFAULT_TRACE_DIR) -> web.Application:
    """The trace server application, reading traces from `trace_dir` (resolved now, against the current dir)."""
    app = web.Application(middlewares=[_errors_as_json])
    app[STORAGE_KEY] = FileTraceStorageHandler(Path(trace_dir).resolve())
    app[VIEWER_KEY] = viewer_html()
    app.on_response_prepare.append(_add_security_headers)
    app.router.add_get("/traces", _list_traces)
    app.router.add_get("/trace/{trace_id}", _get_trace)
    app.router.add_get("/", _viewer_index)
    app.router.add_get("/{trace_id}", _viewer_trace)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_httpserver(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, trace_dir: str | os.PathLike[str] = DEFAULT_TRACE_DIR
) -> None:
    """Serve the trace API and viewer until interrupted (Ctrl-C / SIGTERM). Binds 127.0.0.1 by default."""
    app = create_http_app(trace_dir)
    directory = app[STORAGE_KEY].directory
    if not _is_loopback(host):
        print(
            f"warning: serving traces on {host}, reachable from other machines; traces may hold prompts, "
            "model output and tool data",
            file=sys.stderr,
            flush=True,
        )

    def announce(message: str) -> None:
        print(f"tasktree_dist trace server, traces from {directory}\n{message}", flush=True)

    web.run_app(app, host=host, port=port, print=announce, access_log=None)
