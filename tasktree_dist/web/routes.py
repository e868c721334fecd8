"""Every route of `tasktree serve`, with the access it needs: the one table the server dispatches through.

A request reaches a handler only through a row of `ROUTES`, and a row cannot be written without its access (no
default), so a route added later is either declared here with its scope or unreachable (404). The gate
(web.access) checks the row's access before any handler runs: a token with the scope, then, for rows naming a
`{run}`, that the token's labels match the run's (else 404, as if the run did not exist).

Access: a `Scope` (read, submit, signal, control, admin), `PUBLIC` (the health check only), or `PAGE` (the viewer's
static files: the page that asks for a token holds no data; every datum it shows comes from a scoped route).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .tokens import Scope

PUBLIC: Literal["public"] = "public"
PAGE: Literal["page"] = "page"
Access = Scope | Literal["public", "page"]

#: What a `{placeholder}` of a template matches (runs ids as runs.model.check_run_id allows them).
PLACEHOLDERS = {
    "run": r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}",
    "name": r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}",
    "trace": r"[^/]{1,256}",
    "page": r"(?!api/|api$|traces$|trace/)[^\x00]*",
}


@dataclass(frozen=True)
class Route:
    method: str  # GET (HEAD too) or POST
    template: str  # "/api/runs/{run}/cancel"
    access: Access
    handler: str  # the request handler's method: handler(call) -> Response, or None once it wrote the answer
    #: The action an audit entry records for every attempt (submit, signal, cancel, retry); None: not audited.
    audit: str | None = None
    #: The live stream: EventSource cannot send headers, so a signed ticket in `?ticket=` stands for the token.
    ticket: bool = False
    #: Largest request body (413 above): a submitted spec document is larger than any other body.
    max_body: int = 64 * 1024
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>{PLACEHOLDERS[m.group(1)]})",
                       re.escape(self.template))
        object.__setattr__(self, "pattern", re.compile(regex))

    @property
    def names_run(self) -> bool:
        return "{run}" in self.template


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/health", PUBLIC, "route_health"),
    Route("GET", "/api/config", Scope.READ, "route_config"),
    Route("GET", "/api/runs", Scope.READ, "route_runs"),
    Route("POST", "/api/runs", Scope.SUBMIT, "route_submit", audit="submit", max_body=4 * 1024 * 1024),
    Route("GET", "/api/runs/{run}", Scope.READ, "route_run"),
    Route("GET", "/api/runs/{run}/trace", Scope.READ, "route_run_trace"),
    Route("GET", "/api/runs/{run}/trace/children", Scope.READ, "route_run_trace_children"),
    Route("GET", "/api/runs/{run}/stream", Scope.READ, "route_run_stream", ticket=True),
    Route("POST", "/api/runs/{run}/stream-ticket", Scope.READ, "route_stream_ticket"),
    Route("GET", "/api/runs/{run}/waits", Scope.READ, "route_run_waits"),
    Route("GET", "/api/runs/{run}/tree", Scope.READ, "route_run_tree"),
    Route("POST", "/api/runs/{run}/signals/{name}", Scope.SIGNAL, "route_signal", audit="signal"),
    Route("POST", "/api/runs/{run}/cancel", Scope.CONTROL, "route_cancel", audit="cancel"),
    Route("POST", "/api/runs/{run}/retry", Scope.CONTROL, "route_retry", audit="retry"),
    Route("GET", "/api/audit", Scope.ADMIN, "route_audit"),
    Route("GET", "/traces", Scope.READ, "route_saved_traces"),
    Route("GET", "/trace/{trace}", Scope.READ, "route_saved_trace"),
    Route("GET", "/{page}", PAGE, "route_page"),
)


def match(method: str, path: str, routes: tuple[Route, ...] = ROUTES) -> tuple[Route, dict[str, str]] | list[str]:
    """The route and its path parameters, or the methods the path allows (empty: no such route)."""
    method = "GET" if method == "HEAD" else method
    allowed = []
    for route in routes:
        found = route.pattern.fullmatch(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict()
        allowed.append(route.method)
    return sorted(set(allowed))
