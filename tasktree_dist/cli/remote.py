"""The `tasktree` command talking to a `tasktree serve` (`--server URL`) instead of Redis: what an operator without
Redis credentials does, with the token in TASKTREE_API_TOKEN (sent as Authorization: Bearer; never printed)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit


class RemoteError(Exception):
    """The server refused or could not be reached; the message names the server, the route and its answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def api_request(server: str, method: str, path: str, token: str, timeout: float = 30.0) -> dict[str, Any]:
    """`method path` on `server` with the token; the JSON answer, or RemoteError."""
    if urlsplit(server).scheme not in ("http", "https"):
        raise RemoteError(f"--server {server!r}: use http://host:port or https://host:port")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(server.rstrip("/") + path, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read()).get("detail", "")
        except ValueError:
            detail = ""
        hint = " (set TASKTREE_API_TOKEN)" if error.code == 401 and not token else ""
        raise RemoteError(f"{method} {path} on {server}: {error.code} {detail}{hint}", error.code) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RemoteError(f"cannot reach {server}: {reason}") from None
