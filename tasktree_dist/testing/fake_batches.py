"""The fake LLM server's Files and Batches API (OpenAI's shape), for batch mode's tests and benchmarks.

`/v1/files` takes a JSONL upload (multipart, purpose "batch") and serves any file's content; `/v1/batches` creates,
retrieves, cancels and lists batches. A batch runs its requests when it is first looked at `delay_s` after its
creation (no timers: a test controls time by what it asks); then `outcome` decides its end:
- "completed": every request answered, except a share `error_share` of them (every 1/share-th, so the count is
  exact) that go to the error file as HTTP 500s;
- "expired": the first half answered, the rest in the error file with code `batch_expired`;
- "failed": nothing runs (status failed, an `errors` list).
A batch cancelled first answers nothing. `enabled=False` answers 404 on /v1/batches, as a provider without a Batch
API does. Input lines must be JSON with a `custom_id` and a `body`; a batch with a bad line fails validation.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

JSON = dict[str, Any]
OUTCOMES = ("completed", "expired", "failed")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, code: str = "invalid_request_error") -> web.Response:
    return _json({"error": {"message": message, "type": code, "param": None, "code": code}}, status)


class FakeBatches:
    """Files and batches held in memory; `answer(body)` is the server's chat completion for one request body."""

    def __init__(self, answer: Callable[[JSON], JSON]) -> None:
        self.answer = answer
        self.files: dict[str, tuple[JSON, bytes]] = {}
        self.batches: dict[str, JSON] = {}
        self._ids = itertools.count(1)
        self.delay_s = 0.0
        self.error_share = 0.0
        self.outcome = "completed"
        self.enabled = True
        self.output_override: bytes | None = None  # an output file's content instead of the real one (bad input)

    def configure(self, delay_s: float | None = None, error_share: float | None = None, outcome: str | None = None,
                  enabled: bool | None = None, output_override: bytes | None = None) -> None:
        """Change how batches created from now on (and those not finished yet) end."""
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        for name, value in (("delay_s", delay_s), ("error_share", error_share), ("outcome", outcome),
                            ("enabled", enabled)):
            if value is not None:
                setattr(self, name, value)
        self.output_override = output_override

    def due_now(self) -> int:
        """Batches not finished yet end at their next look, whatever their delay (a test decides when a batch is
        done: configure a long delay_s, check what must hold while it is out, then call this). Returns how many."""
        now = time.monotonic()
        pending = [batch for batch in self.batches.values() if batch["status"] in ("validating", "in_progress")]
        for batch in pending:
            batch["_due"] = now
        return len(pending)

    def reset(self) -> None:
        self.files.clear()
        self.batches.clear()
        self.configure(0.0, 0.0, "completed", True)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{file_id}", self.file_info)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list)
        app.router.add_get("/v1/batches/{batch_id}", self.retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel)

    # -- files ---------------------------------------------------------------------------------------------------
    def _new_file(self, content: bytes, filename: str, purpose: str) -> JSON:
        meta = {"id": f"file-fake{next(self._ids)}", "object": "file", "bytes": len(content),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose}
        self.files[meta["id"]] = (meta, content)
        return meta

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            return _error(400, "a multipart 'file' is required")
        return _json(self._new_file(upload.file.read(), upload.filename or "upload.jsonl",
                                    str(form.get("purpose") or "")))

    async def file_info(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["file_id"])
        return _json(found[0]) if found else _error(404, "No such file", "not_found")

    async def file_content(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["file_id"])
        if found is None:
            return _error(404, "No such file", "not_found")
        return web.Response(body=found[1], content_type="application/octet-stream")

    # -- batches -------------------------------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        if not self.enabled:
            return _error(404, "Unknown request URL: POST /v1/batches", "not_found")
        body = orjson.loads(await request.read())
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            return _error(400, f"input file {file_id!r} not found")
        now = int(time.time())
        batch = {
            "id": f"batch_fake{next(self._ids)}", "object": "batch", "endpoint": body.get("endpoint"),
            "errors": None, "input_file_id": file_id, "completion_window": body.get("completion_window", "24h"),
            "status": "in_progress", "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": now, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "_due": time.monotonic() + self.delay_s,
        }
        lines = self._lines(self.files[file_id][1])
        if lines is None:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "invalid_json_line", "message": "a line is not JSON with custom_id and body"}]})
        else:
            batch["request_counts"]["total"] = len(lines)
        self.batches[batch["id"]] = batch
        return _json(self._public(batch))

    @staticmethod
    def _lines(content: bytes) -> list[JSON] | None:
        lines = []
        for raw in content.splitlines():
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(line, dict) or "custom_id" not in line or not isinstance(line.get("body"), dict):
                return None
            lines.append(line)
        return lines

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "No such batch", "not_found")
        if batch["status"] == "in_progress" and time.monotonic() >= batch["_due"]:
            self._finish(batch)
        return _json(self._public(batch))

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "No such batch", "not_found")
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        return _json(self._public(batch))

    async def list(self, request: web.Request) -> web.Response:
        if not self.enabled:
            return _error(404, "Unknown request URL: GET /v1/batches", "not_found")
        data = [self._public(batch) for batch in reversed(self.batches.values())]
        return _json({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None, "has_more": False})

    @staticmethod
    def _public(batch: JSON) -> JSON:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _finish(self, batch: JSON) -> None:
        now = int(time.time())
        if self.outcome == "failed":
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "server_error", "message": "the batch failed (fake)"}]})
            return
        lines = self._lines(self.files[batch["input_file_id"]][1]) or []
        answered = lines if self.outcome == "completed" else lines[: len(lines) // 2]
        output, errors = [], []
        for n, line in enumerate(lines):
            record: JSON = {"id": f"batch_req_{batch['id']}_{n}", "custom_id": line["custom_id"]}
            if n >= len(answered):
                errors.append({**record, "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}})
            elif self.error_share and int((n + 1) * self.error_share) > int(n * self.error_share):
                errors.append({**record, "error": None, "response": {
                    "status_code": 500, "request_id": f"req_{n}",
                    "body": {"error": {"message": "The server had an error (fake)", "type": "server_error"}}}})
            else:
                output.append({**record, "error": None, "response": {
                    "status_code": 200, "request_id": f"req_{n}", "body": self.answer(line["body"])}})
        jsonl = b"".join(orjson.dumps(item) + b"\n" for item in output)
        if self.output_override is not None:
            jsonl = self.output_override
        if output or self.output_override is not None:
            batch["output_file_id"] = self._new_file(jsonl, f"{batch['id']}_output.jsonl", "batch_output")["id"]
        if errors:
            content = b"".join(orjson.dumps(item) + b"\n" for item in errors)
            batch["error_file_id"] = self._new_file(content, f"{batch['id']}_error.jsonl", "batch_output")["id"]
        status = "completed" if self.outcome == "completed" else "expired"
        batch.update(status=status, **{f"{status}_at": now},
                     request_counts={"total": len(lines), "completed": len(output), "failed": len(errors)})
