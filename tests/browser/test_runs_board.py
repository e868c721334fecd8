"""The runs board in a real browser (Debian's headless Chromium driven by Playwright) against `tasktree serve` with
tokens and a real fleet: the board asks for a token, then lists a running run, its page advances live (server-sent
events with a stream ticket), a failed unit opens with its error, warnings and errors logged in the trace are
listed, cancel works with a token that has the control scope and is disabled with a read-only one, a team's token
sees only its team's runs; screenshots are kept in .artifacts/. Control over HTTP: refused unless the server has a
token, and then without it, with a wrong one, or from another origin."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasktree_dist import RunClient
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.fleet import REPO_ROOT
from tests import run_trees as R
from tests.ops_fleet import ops_fleet, served

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "board-test-token"  # the control token: every scope
VIEWER = "viewer-token-0123456789"  # read only
TEAM = "team-token-0123456789ab"  # read and control, runs labelled team=board only
API_TOKENS = json.dumps([{"name": "viewer", "token": VIEWER, "scopes": ["read"]},
                         {"name": "board-team", "token": TEAM, "scopes": ["read", "control"],
                          "labels": {"team": "board"}}])
ARTIFACTS = REPO_ROOT / ".artifacts"


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    with ops_fleet(redis_url, "ui") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def server(fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tasktree serve --control-token` in its own process, on a free loopback port; stopped by PID."""
    env = {**fleet["env"], "TASKTREE_API_TOKENS": API_TOKENS}
    with served(env, tmp_path_factory.mktemp("traces"), TOKEN) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package (apt-get install "
                    "chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def post(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method="POST", headers=headers or {}, data=b"")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot in the test's tmp dir and in .artifacts/ (kept for people and CI)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def sign_in(page: Any, url: str, token: str, tmp_path: Path | None = None) -> None:
    """Open `url`; the board asks for a token (kept in the tab's sessionStorage): give it `token`."""
    page.goto(url)
    page.locator("#api-token").wait_for(timeout=10_000)
    if tmp_path is not None:
        shot(page, tmp_path, "sign-in.png")
    page.fill("#api-token", token)
    page.click("#sign-in")
    page.locator("#api-token").wait_for(state="detached", timeout=10_000)


def done_count(text: str) -> int:
    match = re.match(r"(\d+)/", text)
    return int(match.group(1)) if match else -1


def test_board_live_run_page_and_a_failed_unit(fleet: dict[str, Any], server: str, browser: Any,
                                               fake_llm: ThreadedFakeLLM, tmp_path: Path) -> None:
    fake_llm.set_latency(1500)  # a run of 5 waves of 20 calls, 7.5 s: long enough to watch on a loaded machine
    client = RunClient(fleet["app"])
    try:
        docs = R.Batch(base_url=fake_llm.base_url, texts=[f"doc{i}" for i in range(100)], models={"42": "fail-500"})
        run = client.submit(R.BatchTree, docs, labels={"team": "board"})
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        sign_in(page, f"{server}/runs", TOKEN, tmp_path)
        card = page.locator(f'[data-state="running"] a.card[data-run="{run.id}"]')
        card.wait_for(timeout=15_000)
        assert "RunBatch" in card.inner_text() and "team=board" in card.inner_text()
        shot(page, tmp_path, "runs-board.png")

        card.click()
        page.wait_for_url(f"{server}/runs/{run.id}")
        page.locator("#run-state[data-state=running]").wait_for(timeout=10_000)
        counts = page.locator("#fanouts .fanout-count")
        counts.first.wait_for(timeout=10_000)
        page.wait_for_function("() => { const c = document.querySelector('#fanouts .fanout-count');"
                               " return c && /^\\d+\\/100/.test(c.textContent) && parseInt(c.textContent) < 100; }",
                               timeout=10_000)
        first = done_count(counts.first.inner_text())
        advanced = f"() => parseInt(document.querySelector('#fanouts .fanout-count').textContent) > {first}"
        page.wait_for_function(advanced, timeout=10_000)  # advances live, no reload
        assert page.locator("#live").inner_text() == "● live"
        # a lane per worker, filling as units finish (rendered at most every 250 ms, so wait for it)
        page.locator("#timeline .lane").first.wait_for(timeout=5_000)

        page.locator("#run-state[data-state=failed]").wait_for(timeout=60_000)
        assert "100/100" in page.locator("#run-progress").inner_text()
        assert "InternalServerError" in page.locator("#run-error").inner_text()
        page.locator("#timeline .lane").nth(1).wait_for(timeout=5_000)  # both workers took units
        failed = page.locator("#failed-units tr[data-unit]")
        assert failed.count() == 1 and "RunDocLLM[42]" in failed.inner_text()
        failed.click()
        error = page.locator("#unit-detail .unit-error")
        error.wait_for(timeout=10_000)
        assert "InternalServerError" in error.inner_text() and "500" in error.inner_text()
        selected = page.locator("#run-trace .row.selected")
        assert "42_Tree(RunDocLLM)" in selected.inner_text()  # the unit's node in the merged trace
        assert "fail-500" in page.locator("#run-logs").inner_text()  # the error logged on the worker, live
        assert page.locator("#retry").is_enabled() and page.locator("#cancel").is_disabled()
        shot(page, tmp_path, "run-page.png")
        assert not errors, errors
    finally:
        client.close()


def test_cancel_from_the_page_with_the_token(fleet: dict[str, Any], server: str, browser: Any,
                                             tmp_path: Path) -> None:
    client = RunClient(fleet["app"])
    try:
        run = client.submit(R.NapsTree, R.Naps(seconds=60, count=3))
        page = browser.new_page()
        page.goto(f"{server}/runs/{run.id}")
        page.fill("#api-token", "wrong-token")
        page.click("#sign-in")  # asked again, with the server's reason
        page.wait_for_function("() => /token not recognised/.test((document.querySelector('#login-message') || {})"
                               ".textContent)", timeout=10_000)
        page.fill("#api-token", VIEWER)
        page.click("#sign-in")
        page.locator("#run-state[data-state=running]").wait_for(timeout=15_000)
        assert page.locator("#cancel").is_disabled()  # read only
        assert "lacks the control scope" in (page.locator("#cancel").get_attribute("title") or "")
        page.click("#sign-out")
        sign_in(page, f"{server}/runs/{run.id}", TOKEN)
        page.locator("#run-state[data-state=running]").wait_for(timeout=15_000)
        page.click("#cancel")
        page.locator("#run-state[data-state=cancelled]").wait_for(timeout=10_000)
        assert client.status(run.id).state.value == "cancelled"
        # the cancel is on the run's page, with who did it (its audit event, live)
        page.wait_for_function("() => document.querySelector('#run-logs').textContent.includes('cancel by control')",
                               timeout=10_000)
    finally:
        client.close()


def test_a_team_token_sees_its_runs_only(fleet: dict[str, Any], server: str, browser: Any, tmp_path: Path) -> None:
    client = RunClient(fleet["app"])
    try:
        mine = client.submit(R.NapsTree, R.Naps(seconds=60, count=1), labels={"team": "board"})
        theirs = client.submit(R.NapsTree, R.Naps(seconds=60, count=1), labels={"team": "other"})
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        sign_in(page, f"{server}/runs", TEAM)
        page.locator(f'a.card[data-run="{mine.id}"]').wait_for(timeout=15_000)
        assert page.locator(f'a.card[data-run="{theirs.id}"]').count() == 0
        shot(page, tmp_path, "runs-board-team.png")
        page.goto(f"{server}/runs/{theirs.id}")  # same tab: the token is still there; the run is not
        page.wait_for_function("() => /No such run/.test(document.body.textContent)", timeout=10_000)
        page.goto(f"{server}/runs/{mine.id}")
        page.locator("#run-state[data-state=running]").wait_for(timeout=15_000)
        assert page.locator("#cancel").is_enabled()
        page.click("#cancel")
        page.locator("#run-state[data-state=cancelled]").wait_for(timeout=10_000)
    finally:
        client.cancel(theirs.id)
        client.close()


def test_control_needs_the_token(fleet: dict[str, Any], server: str) -> None:
    client = RunClient(fleet["app"])
    try:
        run = client.submit(R.NapsTree, R.Naps(seconds=60, count=1))
        cancel = f"{server}/api/runs/{run.id}/cancel"
        assert post(cancel)[0] == 401
        assert post(cancel, {"Authorization": "Bearer nope"})[0] == 401
        assert post(cancel, {"Authorization": f"Bearer {VIEWER}"})[0] == 403  # read only
        assert post(cancel, {"X-Tasktree-Token": TOKEN, "Origin": "http://evil.example"})[0] == 403
        assert client.status(run.id).state.value in ("queued", "running")
        code, body = post(cancel, {"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and body["status"]["state"] == "cancelled"
        assert post(cancel, {"Authorization": f"Bearer {TOKEN}"})[0] == 409  # already finished
        assert post(f"{server}/api/runs/no-such-run/cancel", {"Authorization": f"Bearer {TOKEN}"})[0] == 404
        assert post(f"{server}/traces", {"Authorization": f"Bearer {TOKEN}"})[0] == 405
        for path, code in (("/api/runs/%2e%2e/trace", 400), ("/api/runs/..%2F..%2Fetc/trace", 400),
                           ("/api/runs/a%00b", 400), ("/api/runs/x/y/z", 404)):  # a bad id is bad input: 400
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{server}{path}", timeout=5)
            assert refused.value.code == code, path
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server}/api/runs/{run.id}/stream", timeout=5)
        assert refused.value.code == 401
        stream_request = urllib.request.Request(f"{server}/api/runs/{run.id}/stream",
                                                headers={"Authorization": f"Bearer {VIEWER}"})
        with urllib.request.urlopen(stream_request, timeout=10) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            assert "default-src 'none'" in stream.headers["Content-Security-Policy"]
            assert stream.readline().startswith(b": stream of run")

        # a server started without a token refuses every control action
        from tasktree_dist.web.server import create_runs_app

        plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), create_runs_app(client, REPO_ROOT / ".traces"))
        thread = threading.Thread(target=plain.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{plain.server_address[1]}"
            code, body = post(f"{url}/api/runs/{run.id}/retry", {"Authorization": f"Bearer {TOKEN}"})
            assert code == 403 and "--control-token" in body["detail"]
            with urllib.request.urlopen(f"{url}/api/config", timeout=5) as response:
                assert json.loads(response.read()) == {"auth": False, "control": False, "signal": False,
                                                       "token": None}
        finally:
            plain.shutdown()
            plain.server_close()
    finally:
        client.close()
