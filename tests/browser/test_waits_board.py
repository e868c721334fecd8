"""Waits on the runs board in a real browser (headless Chromium driven by Playwright) against `tasktree serve`
and a real fleet: a parked run sits in the board's `waiting` column, its page shows the wait's prompt and a form
generated from the payload's schema (an enum as a select, required fields starred), and submitting the form with
a token that may signal resumes the run. Over HTTP: the waits listing, and a signal refused without the token, with a
payload that does not fit (the field named) and to a finished run."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasktree_dist import RunClient, RunState
from tests import wait_trees as W

# the Chromium fixture, `tasktree serve --control-token TOKEN` on this module's fleet, signing in, screenshots
from tests.browser.test_runs_board import TOKEN, VIEWER, browser, server, shot, sign_in  # noqa: F401
from tests.ops_fleet import ops_fleet, wait_for

pytestmark = pytest.mark.timeout(120)

@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    with ops_fleet(redis_url, "wboard", "tests.wait_trees") as fleet:
        yield fleet


def call(url: str, body: Any = None, token: str | None = None, method: str = "POST") -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if method == "POST" else None
    request = urllib.request.Request(url, method=method, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_parked_run_is_answered_from_its_page(fleet: dict[str, Any], server: str,  # noqa: F811
                                                browser: Any, tmp_path: Path) -> None:  # noqa: F811
    client = RunClient(fleet["app"])
    try:
        run = client.submit("WaitReview", W.Doc(key="board1"))
        wait_for(lambda: client.status(run.id).state == RunState.WAITING, "the run parks")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        sign_in(page, f"{server}/runs", TOKEN)
        card = page.locator(f'[data-state="waiting"] a.card[data-run="{run.id}"]')
        card.wait_for(timeout=15_000)
        shot(page, tmp_path, "waits-board.png")

        card.click()
        page.wait_for_url(f"{server}/runs/{run.id}")
        form = page.locator('#run-waits form[data-wait="review"]')
        form.wait_for(timeout=10_000)
        assert "Publish 'draft of board1'?" in page.locator("#run-waits").inner_text()
        decision = form.locator('select[data-field="decision"]')
        assert decision.locator("option").all_inner_texts() == ["approve", "reject"]
        assert decision.get_attribute("required") is not None
        assert form.locator('[data-field="note"]').get_attribute("required") is None
        decision.select_option(label="reject")
        form.locator('[data-field="note"]').fill("needs sources")
        shot(page, tmp_path, "waits-run-page.png")
        form.locator('button[type="submit"]').click()
        page.locator("#run-state[data-state=succeeded]").wait_for(timeout=30_000)
        final = client.blackboard(run.id)
        assert (final.decision, final.note) == ("reject", "needs sources")
        assert page.locator("#run-waits").inner_text().strip() == "None."
        assert not errors, errors
    finally:
        client.close()


def test_signals_and_waits_over_http(fleet: dict[str, Any], server: str) -> None:  # noqa: F811
    client = RunClient(fleet["app"])
    try:
        run = client.submit("WaitReview", W.Doc(key="http1"))
        wait_for(lambda: client.status(run.id).state == RunState.WAITING, "the run parks")
        base = f"{server}/api/runs/{run.id}"
        assert call(f"{base}/waits", method="GET")[0] == 401
        status, body = call(f"{base}/waits", token=VIEWER, method="GET")
        assert status == 200 and [w["name"] for w in body["waits"]] == ["review"]
        assert body["waits"][0]["schema"]["required"] == ["decision"]
        assert call(f"{base}/signals/review", {"decision": "approve"})[0] == 401
        status, body = call(f"{base}/signals/review", {"decision": "approve"}, VIEWER)
        assert status == 403 and "lacks the 'signal' scope" in body["detail"]
        status, body = call(f"{base}/signals/review", {"decision": "maybe"}, TOKEN)
        assert status == 400 and "decision: 'maybe' is not one of ['approve', 'reject']" in body["detail"]
        status, body = call(f"{base}/signals/nope", {}, TOKEN)
        assert status == 400 and "no WaitFor named 'nope'" in body["detail"]
        assert call(f"{server}/api/runs/no-such-run/signals/review", {}, TOKEN)[0] == 404
        status, body = call(f"{base}/signals/review?signal_id=h1", {"decision": "approve"}, TOKEN)
        assert (status, body["recorded"]) == (200, True)
        assert client.result(run.id, timeout=30).is_ok()
        status, body = call(f"{base}/signals/review", {"decision": "approve"}, TOKEN)
        assert status == 409 and "succeeded" in body["detail"]
    finally:
        client.close()
