"""The trace server, over real HTTP on 127.0.0.1, with traces saved from real tree runs."""

from __future__ import annotations

import asyncio
import http.server
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import tasktree_dist
from tasktree_dist import Context, FileTraceStorageHandler, Result, Tree
from tasktree_dist.__main__ import build_parser
from tasktree_dist.tracing.httpserver import create_http_app, run_httpserver, viewer_html
from tasktree_dist.tracing.storage import new_trace_id

REPO_ROOT = Path(__file__).resolve().parents[2]
TRANSCRIPT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "<script>alert('x')</script> weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
    {"role": "assistant", "content": "18C and cloudy."},
]


async def _run_and_save(storage: FileTraceStorageHandler, tree: Any) -> str:
    context = Context()
    await tree(context)
    return await storage.save(context.trace_root())


def _chatty(b: Any, tracer: Any) -> Result:
    tracer.update_attributes(worker="worker-a@host", pid=4242, queue="tasktree", chat_transcript=TRANSCRIPT)
    tracer.incr_cost(0.0021)
    tracer.incr_tokens(prompt=120, completion=30)
    tracer.log("called the model")
    return Result.OK({"answer": "18C and cloudy."})


@pytest.fixture
def outside(tmp_path: Path) -> dict[str, str]:
    """A secret in files outside the trace dir: secret.json, etc/passwd and one named like a valid trace id."""
    value = f"TOPSECRET-{uuid.uuid4().hex}"
    parent_id = new_trace_id("secret")
    (tmp_path / "secret.json").write_text(json.dumps({"secret": value}))
    (tmp_path / f"{parent_id}.json").write_text(json.dumps({"secret": value}))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(value)
    return {"secret": value, "parent_id": parent_id}


@pytest.fixture
def secret(outside: dict[str, str]) -> str:
    return outside["secret"]


@pytest.fixture
async def traces(tmp_path: Path, outside: dict[str, str]) -> dict[str, Any]:
    trace_dir = tmp_path / "traces"
    storage = FileTraceStorageHandler(trace_dir)
    ids = []
    for name in ("First", "Second"):
        ids.append(await _run_and_save(storage, Tree(name).Sequence()._().Function(lambda: 1).End()))
    chat_tree = (
        Tree("Chatty")
        .Selector()
        ._().Function(lambda: Result.FAIL("nope"), name="fails")
        ._().Function(_chatty, name="llm")
        .End()
    )
    ids.append(await _run_and_save(storage, chat_tree))
    return {"dir": trace_dir, "ids": ids, "storage": storage, "parent_id": outside["parent_id"]}


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """The handler served by a ThreadingHTTPServer on a free port, as tinytasktree's tests serve it; its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # quick shutdown
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
async def client(traces: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    with serving(create_http_app(traces["dir"])) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            yield c


async def raw_get(client: httpx.AsyncClient, target: str) -> tuple[int, bytes]:
    """GET `target` byte for byte (no client-side normalising or quoting), return (status, body)."""
    reader, writer = await asyncio.open_connection(client.base_url.host, client.base_url.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def content_type(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- API ------------------------------------------------------------------------------------------------------------
async def test_list_newest_first(client: httpx.AsyncClient, traces: dict[str, Any]) -> None:
    response = await client.get("/traces")
    assert response.status_code == 200
    assert content_type(response) == "application/json"
    listed = response.json()
    assert [t["id"] for t in listed] == list(reversed(traces["ids"]))
    assert [t["tree"] for t in listed] == ["chatty", "second", "first"]
    assert listed[0]["name"] == f"{traces['ids'][-1]}.json"  # the file name, as tinytasktree's list says
    assert set(listed[0]) >= {"id", "name", "created_at", "tree"}

    response = await client.get("/traces", params={"limit": "1"})
    assert [t["id"] for t in response.json()] == [traces["ids"][-1]]
    response = await client.get("/traces", params={"limit": "0"})
    assert response.json() == []
    for bad in ("abc", "-1", "1.5"):
        response = await client.get("/traces", params={"limit": bad})
        assert response.status_code == 400, bad
        assert "detail" in response.json()


def test_list_empty_or_missing_dir(tmp_path: Path) -> None:
    with serving(create_http_app(tmp_path / "nope")) as url:
        response = httpx.get(f"{url}/traces")
        assert response.status_code == 200
        assert response.json() == []


async def test_fetch_trace(client: httpx.AsyncClient, traces: dict[str, Any]) -> None:
    trace_id = traces["ids"][0]
    response = await client.get(f"/trace/{trace_id}")
    assert response.status_code == 200
    assert content_type(response) == "application/json"
    data = response.json()
    assert data == await traces["storage"].query(trace_id)
    assert data["name"] == "ROOT" and data["id"] == trace_id
    tree = data["children"]["Tree(First)"]
    assert tree["result"]["status"] == "OK"
    assert "total_cost" in data and "total_tokens" in data


async def test_fetch_trace_with_chat_and_worker(client: httpx.AsyncClient, traces: dict[str, Any]) -> None:
    data = (await client.get(f"/trace/{traces['ids'][-1]}")).json()
    selector = next(iter(data["children"]["Tree(Chatty)"]["children"].values()))
    fails, llm = selector["children"]["Function(fails)"], selector["children"]["Function(llm)"]
    assert fails["result"]["status"] == "FAIL"
    attrs = llm["attributes"]
    assert attrs["worker"] == "worker-a@host" and attrs["has_chat"] is True
    transcript = attrs["chat_transcript"]  # JSON text in tinytasktree's format; a list would do for the viewer too
    assert (json.loads(transcript) if isinstance(transcript, str) else transcript) == TRANSCRIPT
    assert data["total_tokens"] == {"prompt": 120, "completion": 30, "total": 150}
    assert data["total_cost"] == pytest.approx(0.0021)


async def test_missing_trace_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/trace/{new_trace_id('ghost')}")
    assert response.status_code == 404
    assert content_type(response) == "application/json"
    assert "not found" in response.json()["detail"].lower()


@pytest.mark.parametrize(
    "bad", ["not-an-id", "20260101-000000-000000-x-zzzzzzzz", "A" * 300, "%20", "secret.json", "", "NEWLINE"]
)
async def test_invalid_trace_id_is_404_saying_so(client: httpx.AsyncClient, traces: dict[str, Any], bad: str) -> None:
    """As tinytasktree: 404 with `Invalid trace_id`; an id is matched whole (a trailing newline is no id)."""
    if bad == "NEWLINE":
        (traces["dir"] / f"{traces['ids'][0]}\n.json").write_text("{}")
        bad = f"{traces['ids'][0]}%0A"
    status, body = await raw_get(client, f"/trace/{bad}")
    assert status == 404
    assert "Invalid trace_id" in json.loads(body)["detail"]


async def test_path_traversal_never_reads_outside(
    client: httpx.AsyncClient, traces: dict[str, Any], secret: str
) -> None:
    pid = traces["parent_id"]  # a file named like a valid id, one level above the trace dir
    valid = traces["ids"][0]
    targets = [
        "/trace/..%2F..%2Fetc%2Fpasswd",
        "/trace/..%2Fetc%2Fpasswd",
        "/trace/..%2Fsecret",
        "/trace/..%2Fsecret.json",
        f"/trace/..%2F{pid}",
        f"/trace/../{pid}",
        "/trace/../secret.json",
        "/trace/../../etc/passwd",
        "/trace/%2e%2e/secret",
        "/trace/%2e%2e%2fsecret",
        "/trace/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/trace/..%5Csecret",
        "/trace/..%5C..%5Cetc%5Cpasswd",
        "/trace/..\\secret",
        f"/trace/{valid}%2F..%2F..%2Fsecret",
        f"/trace/{valid}/../../secret",
        "/trace/%00",
        f"/trace/{pid}%00",
        "/../secret.json",
        "/..%2Fsecret.json",
        "/%2e%2e/secret.json",
        "/%2e%2e%2fsecret.json",
        "/secret.json",
        "/etc/passwd",
        "/../etc/passwd",
        "/..\\secret.json",
        "/index.html",
        "/ui/index.html",
        "/tasktree_dist/ui/index.html",
        f"/{valid}.json",
        f"/traces/..%2F{pid}",
    ]
    for target in targets:
        status, body = await raw_get(client, target)
        # refused, or the viewer itself (a path naming no file gets the single-page app's index)
        assert status in (400, 404) or (status == 200 and body == viewer_html()), (target, status)
        assert secret.encode() not in body, target

    # a valid id naming a file outside the dir is looked up inside the dir only
    status, body = await raw_get(client, f"/trace/{pid}")
    assert status == 404 and secret.encode() not in body
    # and the viewer route serves the viewer for it, never the file
    status, body = await raw_get(client, f"/{pid}")
    assert status == 200 and body == viewer_html()


# -- viewer and UI root ---------------------------------------------------------------------------------------------
async def test_viewer_served_at_root_and_client_side_routes(client: httpx.AsyncClient, traces: dict[str, Any]) -> None:
    html = viewer_html()
    for path in ("/", f"/{traces['ids'][0]}", f"/{new_trace_id('ghost')}", "/not-a-trace", "/a/b", "/trace"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert content_type(response) == "text/html"
        assert response.content == html
    for path in ("/favicon.ico", "/assets/app.js", "/trace/"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert content_type(response) == "application/json"
    assert (await client.get("/favicon.ico")).json() == {"detail": "not found: /favicon.ico"}


def test_ui_root_assets_and_single_page_fallback(tmp_path: Path) -> None:
    """A UI root of one's own (tinytasktree's `create_http_app(trace_dir, ui_root=...)`): files, then index.html."""
    ui = tmp_path / "ui"
    (ui / "assets").mkdir(parents=True)
    (ui / "index.html").write_text("<html>my ui</html>")
    (ui / "assets" / "app.js").write_text("console.log(1)")
    (tmp_path / "outside.js").write_text("SECRET")
    (ui / "assets" / "link.js").symlink_to(tmp_path / "outside.js")
    with serving(create_http_app(tmp_path / "traces", ui_root=str(ui))) as url, httpx.Client(base_url=url) as http:
        for path in ("/", "/some-trace-id", "/deep/route"):
            response = http.get(path)
            assert response.status_code == 200 and response.text == "<html>my ui</html>", path
            assert content_type(response) == "text/html"
        script = http.get("/assets/app.js")
        assert script.status_code == 200 and script.text == "console.log(1)"
        assert "javascript" in content_type(script)
        missing = http.get("/assets/missing.js")
        assert missing.status_code == 404 and missing.json() == {"detail": "not found: /assets/missing.js"}
        escaped = http.get("/assets/link.js")  # a link out of the UI root is not followed
        assert escaped.status_code == 404 and "SECRET" not in escaped.text
        assert http.get("/traces").json() == []  # the API still wins over the UI


async def test_security_headers_everywhere(client: httpx.AsyncClient, traces: dict[str, Any]) -> None:
    for path in ("/", f"/{traces['ids'][0]}", "/traces", f"/trace/{traces['ids'][0]}", "/nope/nope", "/trace/bad",
                 "/x.js"):
        response = await client.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self' 'unsafe-inline'" in csp
        assert "style-src 'self' 'unsafe-inline'" in csp
        assert "connect-src 'self'" in csp
        assert "*" not in csp and "http" not in csp


async def test_get_and_head_only(client: httpx.AsyncClient, traces: dict[str, Any]) -> None:
    for path in ("/traces", f"/trace/{traces['ids'][0]}", "/"):
        response = await client.post(path, content=b"{}")
        assert response.status_code == 405, path
        assert response.headers["Allow"] == "GET, HEAD"
    response = await client.delete(f"/trace/{traces['ids'][0]}")
    assert response.status_code == 405
    assert (traces["dir"] / f"{traces['ids'][0]}.json").exists()
    head = await client.head(f"/trace/{traces['ids'][0]}")
    get = await client.get(f"/trace/{traces['ids'][0]}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"] == str(len(get.content))


def test_viewer_html_is_self_contained() -> None:
    html = viewer_html().decode("utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "http://" not in html and "https://" not in html
    lowered = html.lower()
    assert "<script src" not in lowered and "<link" not in lowered and "@import" not in lowered
    # trace text (LLM output) is only ever inserted as text
    for sink in ("innerhtml", "outerhtml", "insertadjacenthtml", "document.write", "eval(", "new function"):
        assert sink not in lowered, sink
    # the viewer loads traces from the API this server has
    assert '"/trace/"' in html and "/traces" in html and "location.pathname" in html


def test_viewer_html_is_packaged() -> None:
    path = Path(tasktree_dist.__file__).parent / "tracing" / "ui" / "index.html"
    assert path.read_bytes() == viewer_html()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert "[tool.setuptools.package-data]" in pyproject and '"tasktree_dist.tracing" = ["ui/*"]' in pyproject


# -- binding and CLI ------------------------------------------------------------------------------------------------
def test_default_bind_host_is_loopback() -> None:
    params = inspect.signature(run_httpserver).parameters
    assert params["host"].default == "127.0.0.1"
    assert params["port"].default == 8000
    assert params["trace_dir"].default == ".traces"
    args = build_parser().parse_args(["--httpserver"])
    assert (args.host, args.port, args.trace_dir) == ("127.0.0.1", 8000, ".traces")


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_cli_without_httpserver_prints_help_and_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tasktree_dist"], cwd=tmp_path, env=_cli_env(), capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--httpserver" in done.stderr


def test_cli_starts_server(tmp_path: Path, traces: dict[str, Any]) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "tasktree_dist", "--httpserver", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--trace-dir", str(traces["dir"])],
        cwd=tmp_path,
        env=_cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        listed = None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            while time.monotonic() < deadline:
                assert proc.poll() is None, f"server exited early: {proc.stdout.read() if proc.stdout else ''}"
                try:
                    response = http.get("/traces")
                except httpx.TransportError:
                    time.sleep(0.1)
                    continue
                assert response.status_code == 200
                listed = response.json()
                break
            assert listed is not None, "server did not answer before the deadline"
            assert [t["id"] for t in listed] == list(reversed(traces["ids"]))
            page = http.get(f"/{traces['ids'][0]}")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)  # SIGTERM, to this process only
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait(timeout=10)
        output = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    assert f"http://127.0.0.1:{port}" in output
