"""The runs API: JSON answers over RunClient. Each method serves one row of web.routes.ROUTES (the gate checked the
token, its scope and the run's labels before it is called).

    GET  /api/health                 {"ok": true} (no token)
    GET  /api/config                 {"auth", "control", "token"}: whether tokens are needed, whether this token
                                     may cancel/retry, and its name, scopes and labels
    GET  /api/runs?state=&tree=&limit=&cursor=   {"runs": [RunStatus...], "cursor": str|null}, newest first
                                     (a token with labels lists only runs carrying them)
    GET  /api/runs/{id}              RunStatus (+ duration_s)
    GET  /api/runs/{id}/trace        the run's merged trace as last written (404 before the first write)
    GET  /api/runs/{id}/trace/children?path=<JSON list of child keys>&offset=&limit=
                                     a page of a large fan-out's children (nodes marked `paged` in the trace)
    GET  /api/runs/{id}/tree         a spec run's {document, variables, layout}: the tree the board draws
    GET  /api/runs/{id}/stream       server-sent events: the run's event stream from the start (or Last-Event-ID)
    GET  /api/runs/{id}/waits        {"waits": [{name, node, prompt, schema, since, deadline, execution_id}...]}
    POST /api/runs/{id}/stream-ticket  {"ticket"}: stands for the token on the stream (?ticket=), for 5 minutes
    POST /api/runs/{id}/cancel|retry scope control
    POST /api/runs                   scope submit: {"tree": <name or spec document>, "blackboard": {...}, "run_id":
                                     ..., "labels": {...}, "variables": {...}} -> 201 {"id": ...}; 400 with the
                                     problems (their places in the spec) when it cannot run, nothing queued (a
                                     token with labels: the run carries them)
    POST /api/runs/{id}/signals/{name}  (JSON body: the payload; ?signal_id=) scope signal: 200 {"ok", "recorded"};
                                     400 payload or name refused (the field named), 404 no run, 409 the run has
                                     finished
    GET  /api/audit?limit=&run=      the audit, newest first (scope admin)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import orjson

from ..builder.spec_source import SpecError
from ..core.errors import SignalError
from ..runs.client import RunClient
from ..runs.model import RunNotFoundError, RunQueryError, RunStateError, RunStatus, SubmitError
from ..tracing.httpserver import Response, json_response
from .access import problem

MAX_LIMIT = 1000


def status_json(status: RunStatus) -> dict[str, Any]:
    return {**status.model_dump(mode="json"), "duration_s": status.duration_s}


class RunsAPI:
    def __init__(self, client: RunClient) -> None:
        self.client = client

    def run_labels(self, run_id: str) -> Mapping[str, str] | None:
        """For the gate's label check: the run's labels, None when there is no such run."""
        try:
            return self.client.status(run_id).labels
        except RunNotFoundError:
            return None

    def status(self, run_id: str) -> Response:
        try:
            return json_response(status_json(self.client.status(run_id)))
        except RunNotFoundError as exc:
            return problem(404, str(exc))

    def trace(self, run_id: str) -> Response:
        try:
            self.client.status(run_id)
        except RunNotFoundError as exc:
            return problem(404, str(exc))
        trace = self.client.trace(run_id)
        return json_response(trace) if trace is not None else problem(404, "no trace yet")

    def list(self, params: Mapping[str, str], labels: Mapping[str, str]) -> Response:
        try:
            limit = min(int(params.get("limit", "100")), MAX_LIMIT)
        except ValueError:
            return problem(400, f"limit must be an integer, not {params['limit'][:40]!r}")
        try:  # state, limit and cursor are checked by the client
            page = self.client.list(params.get("state") or None, params.get("tree") or None, limit,
                                    params.get("cursor") or None, labels=labels or None)
        except RunQueryError as exc:
            return problem(400, str(exc))
        return json_response({"runs": [status_json(s) for s in page], "cursor": page.cursor})

    def children(self, run_id: str, params: Mapping[str, str]) -> Response:
        try:
            path = orjson.loads(params.get("path", "[]"))
            offset, limit = int(params.get("offset", "0")), int(params.get("limit", "100"))
        except ValueError:
            return problem(400, "path must be a JSON list of child keys; offset and limit integers")
        if not isinstance(path, list) or not all(isinstance(key, str) for key in path):
            return problem(400, "path must be a JSON list of child keys")
        try:
            self.client.status(run_id)
            return json_response(self.client.trace_children(run_id, path, offset, min(max(limit, 1), MAX_LIMIT)))
        except (RunNotFoundError, LookupError) as exc:
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

    def act(self, run_id: str, action: str) -> Response:
        """cancel / retry (the gate checked the token's scope and labels)."""
        try:
            if action == "cancel":
                cancelled = self.client.cancel(run_id)
                status = self.client.status(run_id)
                if not cancelled:
                    return problem(409, f"run {run_id} had already finished ({status.state.value})")
            else:
                self.client.retry(run_id)
                status = self.client.status(run_id)
        except RunNotFoundError as exc:
            return problem(404, str(exc))
        except RunStateError as exc:
            return problem(409, str(exc))
        return json_response({"ok": True, "status": status_json(status)})
