"""The runs API: JSON answers over RunClient (GET), and the control actions (POST, token checked by the server).

    GET  /api/config                 {"control": bool}: whether cancel/retry are enabled on this server
    GET  /api/runs?state=&tree=&limit=&cursor=   {"runs": [RunStatus...], "cursor": str|null}, newest first
    GET  /api/runs/{id}              RunStatus (+ duration_s)
    GET  /api/runs/{id}/trace        the run's merged trace as last written (404 before the first write)
    GET  /api/runs/{id}/trace/children?path=<JSON list of child keys>&offset=&limit=
                                     a page of a large fan-out's children (nodes marked `paged` in the trace)
    GET  /api/runs/{id}/tree         a spec run's {document, variables, layout}: the tree the board draws
    GET  /api/runs/{id}/stream       server-sent events: the run's event stream from the start (or Last-Event-ID)
    GET  /api/runs/{id}/waits        {"waits": [{name, node, prompt, schema, since, deadline, execution_id}...]}
    POST /api/runs/{id}/cancel|retry with the control token
    POST /api/runs                   {"tree": <name or spec document>, "blackboard": {...}, "run_id": ..., "labels":
                                     {...}, "variables": {...}} with the control token -> 201 {"id": ...}; 400 with
                                     the problems (their places in the spec) when it cannot run, nothing queued
    POST /api/runs/{id}/signals/{name}  (JSON body: the payload; ?signal_id=) with the control token: 200
                                     {"ok", "recorded"}; 400 payload or name refused (the field named), 404 no
                                     run, 409 the run has finished
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from ..builder.spec_source import SpecError
from ..core.errors import SignalError
from ..runs.client import RunClient
from ..runs.model import RunNotFoundError, RunQueryError, RunStateError, RunStatus, SubmitError, check_run_id
from ..tracing.httpserver import Response, json_response

MAX_LIMIT = 1000


def status_json(status: RunStatus) -> dict[str, Any]:
    return {**status.model_dump(mode="json"), "duration_s": status.duration_s}


def problem(status: int, detail: str) -> Response:
    return json_response({"detail": detail}, status)


@dataclass
class Route:
    """`/api/runs/{id}/{action}` split: run id ("" for the list) and action ("" for the run itself)."""

    run_id: str
    action: str

    @classmethod
    def parse(cls, path: str) -> Route | None:
        rest = path.removeprefix("/api/runs").strip("/")
        if not rest:
            return cls("", "")
        run_id, _, action = rest.partition("/")
        try:
            check_run_id(run_id)
        except SubmitError:
            return None
        return cls(run_id, action)


class RunsAPI:
    def __init__(self, client: RunClient, control: bool) -> None:
        self.client = client
        self.control = control

    def get(self, path: str, query: str) -> Response:
        if path == "/api/config":
            return json_response({"control": self.control})
        route = Route.parse(path)
        if route is None:
            return problem(400, f"invalid run id in {path[:200]}: use 1-128 letters, digits or '_.:-'")
        try:
            if not route.run_id:
                return self._list(query)
            if route.action == "":
                return json_response(status_json(self.client.status(route.run_id)))
            if route.action == "trace":
                self.client.status(route.run_id)
                trace = self.client.trace(route.run_id)
                return json_response(trace) if trace is not None else problem(404, "no trace yet")
            if route.action == "tree":
                self.client.status(route.run_id)
                found = self.client.spec(route.run_id)
                return json_response(found) if found is not None else problem(404, "this run was not submitted as "
                                                                                  "a spec")
            if route.action == "trace/children":
                return self._children(route.run_id, query)
            if route.action == "waits":
                return json_response({"waits": [wait.json() for wait in self.client.waits(route.run_id)]})
        except RunNotFoundError as exc:
            return problem(404, str(exc))
        except RunQueryError as exc:
            return problem(400, str(exc))
        return problem(404, f"not found: {path}")

    def _list(self, query: str) -> Response:
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            limit = min(int(params.get("limit", "100")), MAX_LIMIT)
        except ValueError:
            return problem(400, f"limit must be an integer, not {params['limit'][:40]!r}")
        # state, limit and cursor are checked by the client (RunQueryError: 400)
        page = self.client.list(params.get("state") or None, params.get("tree") or None, limit,
                                params.get("cursor") or None)
        return json_response({"runs": [status_json(s) for s in page], "cursor": page.cursor})

    def _children(self, run_id: str, query: str) -> Response:
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            path = orjson.loads(params.get("path", "[]"))
            offset, limit = int(params.get("offset", "0")), int(params.get("limit", "100"))
        except ValueError:
            return problem(400, "path must be a JSON list of child keys; offset and limit integers")
        if not isinstance(path, list) or not all(isinstance(key, str) for key in path):
            return problem(400, "path must be a JSON list of child keys")
        self.client.status(run_id)
        try:
            return json_response(self.client.trace_children(run_id, path, offset, min(max(limit, 1), MAX_LIMIT)))
        except LookupError as exc:
            return problem(404, str(exc))

    def submit(self, body: bytes) -> Response:
        """Queue a run from JSON (any language, no Python client): a registered tree's name or a spec document."""
        try:
            request = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError as exc:
            return problem(400, f"the body is not JSON: {exc}")
        if not isinstance(request, dict):
            return problem(400, "the body is a JSON object: {\"tree\": ..., \"blackboard\": ...}")
        unknown = sorted(set(request) - {"tree", "blackboard", "run_id", "labels", "variables"})
        if unknown:
            return problem(400, f"unknown field(s) {', '.join(unknown)} (accepted: tree, blackboard, run_id, labels, "
                                "variables)")
        tree = request.get("tree")
        if not isinstance(tree, str | dict) or not tree:
            return problem(400, "tree is a registered tree's name or a spec document (an object)")
        variables = request.get("variables") or {}
        if not isinstance(variables, dict):
            return problem(400, "variables is an object of $name values")
        try:
            run = self.client.submit(tree, request.get("blackboard"), run_id=request.get("run_id"),
                                     labels=request.get("labels"), variables=variables)
        except SpecError as exc:
            response = json_response({"detail": str(exc), "problems": [
                {"message": p.message, "pointer": p.pointer, "line": p.line, "column": p.column}
                for p in exc.problems]}, 400)
            return response
        except SubmitError as exc:
            return problem(400, str(exc))
        return json_response({"id": run.id}, 201)

    def signal(self, run_id: str, name: str, query: str, body: bytes) -> Response:
        try:
            payload = orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError as exc:
            return problem(400, f"the request body must be the signal's payload as JSON: {exc}")
        signal_id = parse_qs(query).get("signal_id", [None])[-1]
        try:
            recorded = self.client.signal(run_id, name, payload, signal_id)
        except SignalError as exc:
            return problem({"run": 404, "state": 409}.get(exc.reason, 400), str(exc))
        return json_response({"ok": True, "recorded": recorded})

    def act(self, path: str, body: bytes = b"", query: str = "") -> Response:
        """cancel / retry / signals/{name} (the caller checked the token)."""
        route = Route.parse(path)
        if route is not None and route.run_id and route.action.startswith("signals/"):
            return self.signal(route.run_id, unquote(route.action.removeprefix("signals/")), query, body)
        if route is None or not route.run_id or route.action not in ("cancel", "retry"):
            return problem(404, f"not found: {path}")
        try:
            if route.action == "cancel":
                cancelled = self.client.cancel(route.run_id)
                status = self.client.status(route.run_id)
                if not cancelled:
                    return problem(409, f"run {route.run_id} had already finished ({status.state.value})")
            else:
                self.client.retry(route.run_id)
                status = self.client.status(route.run_id)
        except RunNotFoundError as exc:
            return problem(404, str(exc))
        except RunStateError as exc:
            return problem(409, str(exc))
        return json_response({"ok": True, "status": status_json(status)})
