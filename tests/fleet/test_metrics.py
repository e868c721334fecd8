"""Prometheus metrics scraped from real worker processes while runs go: discovered through the fleet listing
(`tasktree metrics --targets`), counters moving by exactly the work done, gauges back to zero, LLM calls by model
and outcome, and the fleet exporter (`tasktree metrics`)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasktree_dist import RunClient, Status
from tasktree_dist.metrics import parse_port_spec
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.fleet import REPO_ROOT
from tasktree_dist.testing.redis_server import free_port, stop_process
from tests import run_trees as R
from tests.ops_fleet import ops_fleet, tasktree, tasktree_command, wait_for

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    with ops_fleet(redis_url, "metrics") as fleet:
        yield fleet


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: list[Samples], name: str, **labels: str) -> float:
    """Sum of a metric over the processes, over every label set that includes `labels`."""
    return sum(value for one in samples for (n, ls), value in one.items()
               if n == name and set(labels.items()) <= set(ls))


def targets(fleet: dict[str, Any]) -> list[str]:
    done = tasktree(fleet["env"], "metrics", "--targets")
    assert done.returncode == 0, done.stderr
    groups = json.loads(done.stdout)
    return [target for group in groups if group["labels"]["role"] == "worker" for target in group["targets"]]


def test_port_spec() -> None:
    assert parse_port_spec("0") == [] and parse_port_spec("auto") == [0] and parse_port_spec(9100) == [9100]
    assert parse_port_spec("9100-9102") == [9100, 9101, 9102]
    for bad in ("x", "9102-9100", "70000"):
        with pytest.raises(ValueError, match="TASKTREE_METRICS_PORT"):
            parse_port_spec(bad)


async def test_unit_counters_and_gauges_move_with_a_run(fleet: dict[str, Any]) -> None:
    endpoints = wait_for(lambda: (found := targets(fleet)) and len(found) == 2 and found, "two worker endpoints")
    assert all(address.startswith("127.0.0.1:") for address in endpoints)  # bound to loopback by default
    before = [scrape(a) for a in endpoints]
    client = RunClient(fleet["app"])
    try:
        run = await client.asubmit(R.NapsTree, R.Naps(seconds=1.5, count=8))

        def all_running() -> list[Samples] | None:
            now = [scrape(a) for a in endpoints]
            busy = total(now, "tasktree_units_running") == 8 and total(now, "tasktree_units_in_flight") == 8
            return now if busy else None

        during = wait_for(all_running, "8 units running on workers and in flight at the coordinator", 10)
        assert total(during, "tasktree_units_started_total", tree="RunNap") - \
            total(before, "tasktree_units_started_total", tree="RunNap") == 8
        assert (await run.aresult(timeout=30)).status is Status.OK
    finally:
        await client.aclose()

    def settled() -> list[Samples] | None:
        # the state change and the per-tree count are two increments with a Redis read between them: wait for both
        now = [scrape(a) for a in endpoints]
        return now if all(total(now, name, **labels) > total(before, name, **labels) for name, labels in (
            ("tasktree_run_transitions_total", {"state": "succeeded"}),
            ("tasktree_runs_finished_total", {"tree": "RunNaps", "state": "succeeded"}))) else None

    after = wait_for(settled, "the run's success counted")

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("tasktree_units_sent_total", tree="RunNap", queue="tasktree") == 8
    assert moved("tasktree_units_finished_total", tree="RunNap", status="OK") == 8
    assert moved("tasktree_units_finished_total", tree="RunNap", status="FAIL") == 0
    assert moved("tasktree_unit_queue_wait_seconds_count", tree="RunNap") == 8
    assert moved("tasktree_unit_run_seconds_count", tree="RunNap", status="OK") == 8
    assert moved("tasktree_unit_run_seconds_sum", tree="RunNap") >= 8 * 1.5
    assert moved("tasktree_unit_run_seconds_bucket", tree="RunNap", le="1.0") == 0  # each took 1.5 s
    assert moved("tasktree_run_transitions_total", state="running") == 1
    assert total(after, "tasktree_units_running") == 0 and total(after, "tasktree_units_in_flight") == 0
    assert moved("tasktree_lease_expiries_total") == 0 and moved("tasktree_units_redispatched_total") == 0
    # per tree: the run counted with its final state and its duration (each child napped 1.5 s)
    assert moved("tasktree_runs_finished_total", tree="RunNaps", state="succeeded") == 1
    assert moved("tasktree_run_seconds_count", tree="RunNaps", state="succeeded") == 1
    assert moved("tasktree_run_seconds_sum", tree="RunNaps", state="succeeded") >= 1.5


async def test_a_cancelled_run_is_counted_by_the_fleet(fleet: dict[str, Any]) -> None:
    """A cancel made from a client process (the CLI here) is counted by the coordinator, whose metrics are scraped."""
    endpoints = wait_for(lambda: (found := targets(fleet)) and len(found) == 2 and found, "two worker endpoints")
    before = [scrape(a) for a in endpoints]
    client = RunClient(fleet["app"])
    try:
        run = await client.asubmit(R.NapTree, R.Nap(seconds=30))
        wait_for(lambda: total([scrape(a) for a in endpoints], "tasktree_units_running") >= 1, "the nap running")
        done = tasktree(fleet["env"], "cancel", run.id)
        assert done.returncode == 0, done.stderr
        assert (await run.astatus()).state.value == "cancelled"
    finally:
        await client.aclose()

    def counted() -> list[Samples] | None:
        now = [scrape(a) for a in endpoints]
        return now if total(now, "tasktree_runs_finished_total", tree="RunNap", state="cancelled") > \
            total(before, "tasktree_runs_finished_total", tree="RunNap", state="cancelled") else None

    after = wait_for(counted, "the cancelled run counted by its coordinator")
    assert total(after, "tasktree_run_transitions_total", state="cancelled") - \
        total(before, "tasktree_run_transitions_total", state="cancelled") == 1
    assert total(after, "tasktree_run_seconds_count", tree="RunNap", state="cancelled") - \
        total(before, "tasktree_run_seconds_count", tree="RunNap", state="cancelled") == 1


async def test_llm_calls_by_model_and_outcome(fleet: dict[str, Any], fake_llm: ThreadedFakeLLM) -> None:
    endpoints = targets(fleet)
    before = [scrape(a) for a in endpoints]
    client = RunClient(fleet["app"])
    try:
        board = R.Batch(base_url=fake_llm.base_url, texts=[f"doc{i}" for i in range(5)], models={"2": "fail-429"})
        run = await client.asubmit(R.BatchTree, board)
        assert (await run.aresult(timeout=30)).status is Status.FAIL
        status = await run.astatus()
    finally:
        await client.aclose()
    after = wait_for(lambda: (now := [scrape(a) for a in endpoints]) and total(
        now, "tasktree_run_transitions_total", state="failed") > total(
        before, "tasktree_run_transitions_total", state="failed") and now, "the run's failure counted")

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("tasktree_llm_calls_total", model="fake-gpt", status="ok") == 4
    assert moved("tasktree_llm_calls_total", model="fail-429", status="rate_limited") == 1
    assert moved("tasktree_llm_call_seconds_count") == 5
    prompt, completion = (moved("tasktree_llm_tokens_total", model="fake-gpt", kind=kind)
                          for kind in ("prompt", "completion"))
    assert prompt > 0 and completion > 0 and prompt + completion == status.tokens
    assert moved("tasktree_units_finished_total", tree="RunDocLLM", status="FAIL") == 1
    assert moved("tasktree_units_finished_total", tree="RunDocLLM", status="OK") == 4


def test_fleet_exporter(fleet: dict[str, Any]) -> None:
    port = free_port()
    exporter = subprocess.Popen([*tasktree_command(), "metrics", "--port", str(port)], cwd=REPO_ROOT,
                                env=fleet["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def scraped() -> Samples | None:
            try:
                return scrape(f"127.0.0.1:{port}")
            except OSError:
                assert exporter.poll() is None, exporter.stdout.read() if exporter.stdout else ""
                return None

        samples = wait_for(scraped, "the exporter answering", 20)
        assert samples[("tasktree_fleet_processes", (("role", "worker"),))] == 2
        assert samples[("tasktree_runs", (("state", "running"),))] == 0
        assert samples[("tasktree_queue_length", (("queue", "tasktree"),))] == 0
        assert ("tasktree_queue_length", (("queue", "tasktree.runs"),)) in samples
    finally:
        stop_process(exporter)
