"""The trace server: a small read-only HTTP API over a trace directory, plus the trace viewer.

`create_http_app(trace_dir, ui_root=None)` returns a request handler class for the standard library's
`http.server` (tinytasktree's API: `ThreadingHTTPServer(address, create_http_app(...))`); `run_httpserver` serves
one. Routes (GET and HEAD; any other method is 405):

- ``/traces?limit=N``  saved traces, newest first (``[{"id", "name", "created_at", "tree"}]``, default limit 100)
- ``/trace/{id}``      one trace's JSON; 404 with ``Invalid trace_id: ...`` for an id this library never makes,
                       404 ``Trace not found: ...`` for a missing one
- anything else        a file of the UI root (default: the packaged viewer, one self-contained HTML file); a path
                       without a dot that names no file gets the UI's index.html (the single-page app's fallback:
                       ``/{id}`` opens that trace); otherwise 404 ``not found: <path>``

Every id is matched whole against the storage's id pattern before any file system access, and UI paths with
``..``, a backslash or a NUL byte, or resolving outside the UI root, are refused: no request can read a file
outside the trace directory and the UI root. Traces can hold prompts, LLM output and tool data: the server binds
127.0.0.1 unless told otherwise, and every response carries headers that keep the browser from running or
framing anything foreign.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import json
import mimetypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from ..core.log import logger
from .storage import FileTraceStorageHandler, InvalidTraceIdError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_TRACE_DIR = ".traces"
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000

#: Script, style, images and fonts from the page itself or the same origin, fetches to the same origin, nothing
#: else (no frames, no forms, no other origin). Trace text is only ever put in the page as text, never as markup.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; font-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def packaged_ui() -> Traversable:
    """The directory of the packaged viewer (tasktree_dist/tracing/ui, its index.html)."""
    return resources.files("tasktree_dist.tracing").joinpath("ui")


def viewer_html() -> bytes:
    """The packaged viewer page."""
    return packaged_ui().joinpath("index.html").read_bytes()


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
    return Response(status, body, "application/json", {"Cache-Control": "no-store"})


def not_found(detail: str) -> Response:
    return json_response({"detail": detail}, 404)


def _ui_parts(path: str) -> list[str] | None:
    """The path's segments under the UI root, or None when they could step outside it."""
    parts = [part for part in PurePosixPath(path.lstrip("/")).parts if part not in ("", ".")]
    if any(part == ".." or "\\" in part or "\x00" in part for part in parts):
        return None
    return parts


def _inside(root: Traversable, candidate: Traversable) -> bool:
    """A file-system candidate resolves inside the root (a symbolic link may point elsewhere)."""
    if not isinstance(root, Path) or not isinstance(candidate, Path):
        return True  # inside a zip: no links to follow
    return candidate.resolve().is_relative_to(root.resolve())


def ui_response(root: Traversable, path: str) -> Response | None:
    """A file of the UI root, the index for a dotless path (client-side routes), or None."""
    parts = _ui_parts(path)
    if parts is None:
        return None
    candidate = root.joinpath(*parts) if parts else root.joinpath("index.html")
    if candidate.is_file() and _inside(root, candidate):
        content_type = mimetypes.guess_type(parts[-1] if parts else "index.html")[0] or "application/octet-stream"
    elif not any("." in part for part in parts) and (index := root.joinpath("index.html")).is_file():
        candidate, content_type = index, "text/html"
    else:
        return None
    if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
        content_type += "; charset=utf-8"
    return Response(200, candidate.read_bytes(), content_type, {"Cache-Control": "no-cache"})


class TraceRequestHandler(http.server.BaseHTTPRequestHandler):
    """Serves one trace directory and one UI root (class attributes set by `create_http_app`)."""

    storage: ClassVar[FileTraceStorageHandler]
    ui_root: ClassVar[Traversable | None]
    protocol_version = "HTTP/1.1"
    server_version = "tasktree_dist"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("trace server: " + format, *args)

    def do_GET(self) -> None:
        self._send(self._respond())

    def do_HEAD(self) -> None:
        self._send(self._respond(), body=False)

    def _not_allowed(self) -> None:
        response = json_response({"detail": "Method Not Allowed"}, 405)
        response.headers.update({"Allow": "GET, HEAD", "Connection": "close"})  # its body is left unread
        self.close_connection = True
        self._send(response)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed  # noqa: N815

    def _respond(self) -> Response:
        url = urlsplit(self.path)
        try:
            if url.path == "/traces":
                return self._list(url.query)
            if url.path.startswith("/trace/"):
                return self._trace(unquote(url.path.removeprefix("/trace/")))
            found = ui_response(self.ui_root, url.path) if self.ui_root is not None else None
            return found or not_found(f"not found: {url.path}")
        except Exception:  # noqa: BLE001 - a request must not take the thread down unanswered
            logger.exception("trace server: %s %s failed", self.command, self.path)
            return json_response({"detail": "internal error"}, 500)

    def _list(self, query: str) -> Response:
        raw = parse_qs(query).get("limit", [None])[-1]
        limit = DEFAULT_LIST_LIMIT
        if raw is not None:
            try:
                limit = int(raw)
            except ValueError:
                return json_response({"detail": "limit must be an integer"}, 400)
            if limit < 0:
                return json_response({"detail": "limit must be >= 0"}, 400)
            limit = min(limit, MAX_LIST_LIMIT)
        return json_response(asyncio.run(self.storage.list_traces(limit=limit)))

    def _trace(self, trace_id: str) -> Response:
        try:
            return json_response(asyncio.run(self.storage.query(trace_id)))
        except InvalidTraceIdError as exc:
            return not_found(str(exc))
        except FileNotFoundError:
            return not_found(f"Trace not found: {trace_id}")
        except (OSError, ValueError):  # unreadable or corrupt file
            return json_response({"detail": f"Trace could not be read: {trace_id}"}, 500)

    def _send(self, response: Response, body: bool = True) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in {**SECURITY_HEADERS, **response.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)


def create_http_app(
    trace_dir: str | os.PathLike[str] = DEFAULT_TRACE_DIR, ui_root: str | os.PathLike[str] | Traversable | None = None
) -> type[TraceRequestHandler]:
    """A request handler class serving `trace_dir` (resolved now, against the current directory) and `ui_root`
    (default: the packaged viewer) to pass to `http.server.ThreadingHTTPServer`."""
    root = packaged_ui() if ui_root is None else ui_root
    attributes = {
        "storage": FileTraceStorageHandler(Path(trace_dir).resolve()),
        "ui_root": Path(root) if isinstance(root, str | os.PathLike) else root,
    }
    return type("TraceRequestHandler", (TraceRequestHandler,), attributes)


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
    handler = create_http_app(trace_dir)
    serve_until_stopped(
        http.server.ThreadingHTTPServer((host, port), handler), "traces",
        lambda url: f"tasktree_dist trace server, traces from {handler.storage.directory}\nserving on {url} "
                    "(Ctrl-C to stop)",
    )


def serve_until_stopped(server: http.server.HTTPServer, what: str, banner: Callable[[str], str]) -> None:
    """Serve until Ctrl-C or SIGTERM, warning first when reachable from other machines; `banner(url)` is printed
    once listening."""
    host, port = server.server_address[:2]
    if not _is_loopback(str(host)):
        print(
            f"warning: serving {what} on {host}, reachable from other machines; {what} may hold prompts, "
            "model output and tool data",
            file=sys.stderr,
            flush=True,
        )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # close the socket on the way out
    print(banner(f"http://{host}:{port}"), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
