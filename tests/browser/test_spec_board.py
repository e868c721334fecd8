"""The run page draws a spec run's tree with each node's live status (real workers, `tasktree serve`, Chromium)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tasktree_dist import RunClient
from tests.browser.test_runs_board import ARTIFACTS, browser  # noqa: F401 - the Chromium fixture
from tests.helpers import two_workers
from tests.ops_fleet import served

pytestmark = pytest.mark.timeout(120)

SPEC = {
    "tasktree": 1,
    "name": "board_tree",
    "blackboard": {"type": "object", "properties": {"gate": {"type": "string"}}, "required": ["gate"]},
    "root": {"kind": "Sequence", "children": [
        {"kind": "Selector", "children": [
            {"kind": "Failure"},
            {"kind": "TODO", "name": "chosen"},
            {"kind": "TODO", "name": "never"},
        ]},
        {"kind": "Function", "func": "gate"},
        {"kind": "Log", "msg_or_factory": "done"},
    ]},
}


@pytest.fixture(scope="module")
def board_fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    with two_workers(redis_url, (8, 9), "tests.spec_trees", "board") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def server(board_fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served(board_fleet["env"], tmp_path_factory.mktemp("traces")) as url:
        yield url


def status_of(page: Any, path: str) -> str:
    return page.get_attribute(f'.tt-node[data-path$="{path}"]', "data-status")


def wait_status(page: Any, path: str, status: str) -> None:
    page.wait_for_function("([path, status]) => {"
                           " const n = document.querySelector(`.tt-node[data-path$=\"${path}\"]`);"
                           " return n && n.dataset.status === status; }", arg=[path, status], timeout=20_000)


def test_the_run_page_draws_the_tree_with_live_statuses(board_fleet: dict[str, Any], server: str,
                                                        browser: Any) -> None:  # noqa: F811
    gate = f"spec-test:gate:{uuid.uuid4().hex}"
    with RunClient(board_fleet["app"]) as client:
        run = client.submit(SPEC, {"gate": gate})
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{server}/runs/{run.id}")
            page.wait_for_selector("#tree-section:not([hidden]) .tt-node", timeout=20_000)
            # the gate step is running (its unit is on a worker): drawn as running, the Log after it pending
            wait_status(page, "/Function(gate)", "running")
            assert status_of(page, "/Log(info)") == "pending"
            assert status_of(page, "/Selector/TODO(chosen)") == "ok"
            redis.Redis.from_url(board_fleet["env"]["TASKTREE_REDIS_URL"]).set(gate, "1", ex=60)
            assert run.result(timeout=60).is_ok()
            wait_status(page, "/Log(info)", "ok")
            statuses = page.eval_on_selector_all(".tt-node", "ns => ns.map(n => [n.textContent, n.dataset.status])")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "spec-board-tree.png"), full_page=True)
        finally:
            page.close()
    assert statuses == [["Sequence", "ok"], ["Selector", "ok"], ["Failure", "fail"], ["TODO(chosen)", "ok"],
                        ["TODO(never)", "pending"], ["Function(gate)", "ok"], ["Log(info)", "ok"]]
