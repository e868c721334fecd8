"""Runs on real processes: submit from an app that exits, watch, list, cancel from another process, retry, keep
partial work under a Timeout, and every key with a TTL. A private redis-server, two `celery -A worker worker`
processes serving units and coordinators, and the fake LLM server over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tasktree_dist import Context, RunClient, RunNotFoundError, RunState, RunStateError, Status, SubmitError
from tasktree_dist.distributed import CeleryExecutor, keys, record_codec
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.fleet import REPO_ROOT
from tasktree_dist.testing.redis_server import stop_process
from tests import run_trees as R
from tests.helpers import eventually, two_workers

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def runs_fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    """Two workers serving units and the runs queue (own Redis databases), stopped by PID."""
    with two_workers(redis_url, (4, 5), "tests.run_trees", "runs", concurrency=64) as fleet:
        yield fleet


@pytest.fixture
async def client(runs_fleet: dict[str, Any]) -> AsyncIterator[RunClient]:
    client = RunClient(runs_fleet["app"])
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def llm(fake_llm: ThreadedFakeLLM) -> ThreadedFakeLLM:
    fake_llm.set_latency(20)
    return fake_llm


def batch(llm: ThreadedFakeLLM, n: int, models: dict[str, str] | None = None) -> R.Batch:
    return R.Batch(base_url=llm.base_url, texts=[f"doc{i}" for i in range(n)], models=models or {})


async def run_inline(runs_fleet: dict[str, Any], tree: Any, blackboard: Any, **settings: Any) -> tuple[Any, Context]:
    """`await tree(context)` in this process with a CeleryExecutor (an inline run): its result and context."""
    executor = CeleryExecutor(runs_fleet["app"], settings=runs_fleet["settings"].model_copy(update=settings))
    context = Context(executor=executor)
    try:
        async with context.using_blackboard(blackboard):
            return await tree(context), context
    finally:
        await executor.aclose()


def run_script(code: str, env: dict[str, str], timeout: float = 60) -> str:
    """Run Python in a separate process (another application) and return what it printed."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


async def test_an_app_submits_and_exits_the_run_completes_in_the_fleet(
    client: RunClient, runs_fleet: dict[str, Any], llm: ThreadedFakeLLM
) -> None:
    code = f"""
from tasktree_dist import RunClient
from tasktree_dist.distributed import create_app
from tests import run_trees as R
run = RunClient(create_app()).submit(R.BatchTree, R.Batch(base_url={llm.base_url!r}, texts=["a", "b", "c"]),
                                     labels={{"team": "search"}})
print(run.id)
"""
    started = time.monotonic()
    run_id = run_script(code, runs_fleet["env"])
    assert time.monotonic() - started < 30  # returned at once (plus interpreter start-up)
    run = await client.aget(run_id)
    result = await run.aresult(timeout=60)
    assert result.status is Status.OK
    board = await run.ablackboard()
    assert isinstance(board, R.Batch) and board.answers == ["summary of a", "summary of b", "summary of c"]
    status = await run.astatus()
    assert status.state is RunState.SUCCEEDED and status.labels == {"team": "search"}
    assert status.progress.done == status.progress.total == 3 and status.progress.failed == 0
    assert status.started_at and status.finished_at and status.finished_at >= status.started_at
    assert status.tokens and status.tokens > 0
    trace = await run.atrace()
    gather = trace["children"]["Tree(RunBatch)"]["children"]["Sequence"]["children"]["Gather"]
    assert len(gather["children"]) == 3
    assert all(child["attributes"]["worker"].startswith("runs") for child in gather["children"].values())


async def test_submit_is_idempotent_by_run_id(client: RunClient, llm: ThreadedFakeLLM) -> None:
    run_id = f"idem-{time.time_ns()}"
    first = await client.asubmit(R.BatchTree, batch(llm, 2), run_id=run_id)
    second = await client.asubmit(R.BatchTree, batch(llm, 2), run_id=run_id)
    assert first.id == second.id == run_id
    # the key names one submission: another blackboard or another tree is refused, naming both
    with pytest.raises(SubmitError, match=r"run id 'idem-\d+' of tree 'RunBatch' was submitted with another "
                       r"blackboard \(.*there, .*here\)"):
        await client.asubmit(R.BatchTree, batch(llm, 5), run_id=run_id)
    with pytest.raises(SubmitError, match=r"is a run of tree 'RunBatch', not of 'RunNap'"):
        await client.asubmit(R.NapTree, R.Nap(), run_id=run_id)
    assert (await first.aresult(timeout=60)).status is Status.OK
    assert llm.calls == 2  # the second submit queued nothing
    runs = await client.alist(tree="RunBatch", limit=500)
    assert [r.id for r in runs].count(run_id) == 1


async def test_bad_submissions_are_refused_and_nothing_is_queued(client: RunClient, llm: ThreadedFakeLLM) -> None:
    from tasktree_dist import Tree

    before = await client.alist(limit=1000)
    with pytest.raises(SubmitError, match="blackboard.base_url"):
        await client.asubmit(R.BatchTree, R.Batch(base_url=object()))  # type: ignore[arg-type]
    with pytest.raises(SubmitError, match="NoSuchTree"):
        await client.asubmit("NoSuchTree", {})
    unregistered = Tree[R.Batch]("").Sequence()._().TODO().End()
    with pytest.raises(SubmitError, match="not registered"):
        await client.asubmit(unregistered, R.Batch())
    with pytest.raises(SubmitError, match="invalid run id"):
        await client.asubmit(R.BatchTree, R.Batch(), run_id="bad id\n")
    assert len(await client.alist(limit=1000)) == len(before)
    with pytest.raises(RunNotFoundError):
        await client.aresult("never-submitted", timeout=1)


async def test_a_fingerprint_mismatch_names_the_worker(
    client: RunClient, runs_fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(R.NapTree, "fingerprint", "0000000000000000")
    with pytest.raises(SubmitError, match=r"0000000000000000.*on worker runs[12]@"):
        await client.asubmit(R.NapTree, R.Nap())


async def test_events_are_live_and_replayable_and_runs_list_by_state(
    client: RunClient, llm: ThreadedFakeLLM
) -> None:
    run = await client.asubmit(R.BatchTree, batch(llm, 30))
    live = [event async for event in run.events(from_id="0", follow=True)]
    kinds = [event.type for event in live]
    assert kinds[0] == "state" and live[0].data["state"] == "queued"
    assert live[-1].type == "state" and live[-1].data["state"] == "succeeded"
    assert {"running"} <= {e.data.get("state") for e in live if e.type == "state"}
    units = [e for e in live if e.type == "unit"]
    assert len(units) == 30 and all(e.data["status"] == "OK" and e.data["worker"] for e in units)
    progress = [e for e in live if e.type == "progress"]
    assert progress and progress[-1].data["done"] == progress[-1].data["total"] == 30
    replayed = [event async for event in run.events(from_id="0", follow=False)]
    assert [e.id for e in replayed] == [e.id for e in live]
    middle = live[len(live) // 2].id
    assert [e.id for e in [x async for x in run.events(from_id=middle, follow=False)]] == \
        [e.id for e in live if _stream_id(e.id) > _stream_id(middle)]

    sleeper = await client.asubmit(R.NapTree, R.Nap(seconds=30))
    await eventually(lambda: _state_is(client, sleeper.id, RunState.RUNNING), "the nap running")
    running = await client.alist(state="running", limit=100)
    succeeded = await client.alist(state=RunState.SUCCEEDED, limit=100)
    assert sleeper.id in [r.id for r in running] and run.id not in [r.id for r in running]
    assert run.id in [r.id for r in succeeded] and all(r.state is RunState.SUCCEEDED for r in succeeded)
    assert await sleeper.acancel() is True
    assert await sleeper.acancel() is False  # already cancelled: nothing changes
    assert (await sleeper.astatus()).state is RunState.CANCELLED


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id in order ('…-10' comes after '…-9', which a string comparison gets wrong)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _state_is(client: RunClient, run_id: str, state: RunState) -> bool:
    return (await client.astatus(run_id)).state is state


async def test_cancel_from_another_process_stops_running_units_and_keeps_finished_work(
    client: RunClient, runs_fleet: dict[str, Any], llm: ThreadedFakeLLM
) -> None:
    llm.set_latency(200)
    with canceller(runs_fleet["env"]) as cancel:
        await asyncio.wait_for(asyncio.to_thread(cancel.stdout.readline), 60)  # "ready": it has imported
        run = await client.asubmit(R.BatchTree, batch(llm, 200))
        await eventually(lambda: _done_at_least(run, 40), "40 units recorded", within=30)  # with their events
        out, err = await asyncio.to_thread(cancel.communicate, f"{run.id}\n", 60)
    assert cancel.returncode == 0 and out.strip() == "True", err[-3000:]
    await eventually(lambda: _idle(llm), "no LLM call in flight", within=5)  # the units stopped on their workers
    calls = llm.calls
    result = await run.aresult(timeout=10)  # waits for the coordinator's final write
    assert result.status is Status.FAIL
    status = await run.astatus()
    assert status.state is RunState.CANCELLED and "cancelled" in status.error.message
    assert llm.calls == calls and calls < 200  # nothing started after the cancel
    trace = await run.atrace()
    gather = trace["children"]["Tree(RunBatch)"]["children"]["Sequence"]["children"]["Gather"]["children"]
    kept = [c for c in gather.values() if c["result"] and c["result"]["status"] == "OK"]
    events = [e async for e in run.events(follow=False)]
    cancel_at = next(e.id for e in events if e.type == "state" and e.data["state"] == "cancelled")
    before = [e for e in events if e.type == "unit" and e.data["status"] == "OK" and e.id < cancel_at]
    statuses = [c["result"]["status"] if c["result"] else None for c in gather.values()]
    assert len(kept) >= len(before) >= 40, (len(gather), statuses.count("OK"), statuses.count("FAIL"),
                                            statuses.count(None), trace["logs"], trace["end_at"], cancel_at)
    assert all(c["attributes"]["worker"] for c in kept)


@contextlib.contextmanager
def canceller(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Another process that prints "ready" once imported, then cancels the run whose id it reads and prints what
    cancel() returned. Started before the run: the few seconds its imports take on a loaded machine are not spent
    while the run is racing to its end. Killed by PID if still there on the way out."""
    code = """
import sys
from tasktree_dist import RunClient
from tasktree_dist.distributed import create_app
client = RunClient(create_app())
print("ready", flush=True)
print(client.cancel(sys.stdin.readline().strip()))
"""
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        stop_process(process)


async def _done_at_least(run: Any, n: int) -> bool:
    """At least `n` units recorded: each record is written with its 'unit' event (one script)."""
    return (await run.astatus()).progress.done >= n


async def _idle(llm: ThreadedFakeLLM) -> bool:
    return llm.stats.in_flight == 0


async def test_retry_reruns_only_the_failed_units(client: RunClient, llm: ThreadedFakeLLM) -> None:
    tag = time.time_ns()
    models = {"3": f"fail-500-first-1-a{tag}", "7": f"fail-500-first-1-b{tag}"}
    run = await client.asubmit(R.BatchTree, batch(llm, 10, models))
    first = await run.aresult(timeout=60)
    status = await run.astatus()
    assert first.status is Status.FAIL and status.state is RunState.FAILED
    assert status.progress.failed == 2 and "RunDocLLM" in status.error.node and status.error.worker
    assert llm.calls == 10
    logs = [e.data async for e in run.events(follow=False) if e.type == "log"]
    worker_errors = [log for log in logs if log["level"] == "error" and log["node"].endswith("/Sequence/LLM")]
    assert len(worker_errors) == 2 and "500" in worker_errors[0]["message"]  # logged on a worker, reported here
    assert any(log["level"] == "warning" and "2 of 10 trees failed" in log["message"] for log in logs)
    await run.aretry()
    second = await run.aresult(timeout=60)
    assert second.status is Status.OK and llm.calls == 12  # only the two failed documents ran again
    board = await run.ablackboard()
    assert board.answers == [f"summary of doc{i}" for i in range(10)]
    status = await run.astatus()
    assert status.state is RunState.SUCCEEDED and status.attempt == 1 and status.progress.failed == 0
    with pytest.raises(Exception, match="only failed or cancelled"):
        await run.aretry()


async def test_a_retry_never_goes_ahead_while_the_cancelled_runs_coordinator_is_still_closing(
    client: RunClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry started while the cancelled attempt's coordinator is alive and still stopping the run would meet the
    cancel markers that coordinator writes for the units it abandons (its units would stop as cancelled): past the
    wait it is refused, saying why, and nothing changes."""
    import tasktree_dist.runs.client as client_module
    from tasktree_dist.runs.store import RunStore

    monkeypatch.setattr(client_module, "CLOSE_WAIT_S", 0.3)
    store: RunStore = client._store()
    run_id, closer = f"closing-{time.time_ns()}", f"closer-{time.time_ns()}"
    await store.redis.set(keys.heartbeat(closer), 1, ex=60)  # the closing coordinator is alive
    assert await store.create(run_id, RunState.CANCELLED, {"tree": "RunBatch", "closing": closer})
    with pytest.raises(RunStateError, match=f"still being stopped by its coordinator {closer}"):
        await client.aretry(run_id)
    assert (await client.astatus(run_id)).state is RunState.CANCELLED  # not queued again
    await store.redis.delete(keys.heartbeat(closer))


async def test_timeout_around_a_remote_gather_keeps_the_finished_children(
    runs_fleet: dict[str, Any], llm: ThreadedFakeLLM
) -> None:
    warm = Context()  # the first LLM call of a process pays for imports and the client: not part of the timing
    async with warm.using_blackboard(R.Doc("warm-up", llm.base_url)):
        assert (await R.DocLLM(warm)).status is Status.OK
    llm.set_latency(300)
    local_docs, local = await _run_timed(Context(), batch(llm, 40))
    llm.reset()
    executor = CeleryExecutor(runs_fleet["app"], settings=runs_fleet["settings"])
    try:
        dist_docs, dist = await _run_timed(Context(executor=executor), batch(llm, 40))
    finally:
        await executor.aclose()
    # the same timings keep the same work (give or take one round of the concurrency limit, 5)
    assert local["done"] >= 10 and abs(dist["done"] - local["done"]) <= 5, (local, dist)
    assert dist["answers"] == dist["done"] and local["answers"] == local["done"]  # changes applied in place
    # unfinished children in the trace: one limit's worth in process; distributed, the units out, which with the
    # fan-out's lookahead (TASKTREE_DISPATCH_LOOKAHEAD, 1.0) are twice the limit: running or waiting for a slot
    assert dist["nodes"] <= dist["done"] + 10 and local["nodes"] <= local["done"] + 5
    assert dist["tokens"] > 0  # tokens and cost of finished children are kept too


async def _run_timed(context: Context, board: R.Batch) -> tuple[list[R.Doc], dict[str, int]]:
    docs: list[R.Doc] = []

    def capture(b: R.Batch) -> Any:
        trees, made = R.batch_docs(b)
        docs.extend(made)
        return trees, made

    gather = R.TimedBatch.nodes["RunTimedBatch/Timeout/Gather"]
    original = gather._factory
    gather._factory = capture  # type: ignore[method-assign]
    try:
        async with context.using_blackboard(board):
            result = await R.TimedBatch(context)
    finally:
        gather._factory = original  # type: ignore[method-assign]
    assert result.status is Status.FAIL
    trace = context.trace_root()
    [gather_node] = [n for n in trace.walk() if n.kind == "Gather"]
    children = gather_node.child_list()
    done = [c for c in children if c.result is not None and c.result.is_ok()]
    return docs, {
        "done": len(done), "nodes": len(children), "answers": sum(1 for d in docs if d.answer),
        "tokens": trace.total_tokens().get("total", 0),
    }


async def test_every_key_a_run_writes_has_a_ttl(client: RunClient, llm: ThreadedFakeLLM,
                                                runs_fleet: dict[str, Any]) -> None:
    run = await client.asubmit(R.BatchTree, batch(llm, 5))
    assert (await run.aresult(timeout=60)).status is Status.OK
    redis = client._store().redis
    names = [name async for name in redis.scan_iter(match=f"{keys.PREFIX}:*")]
    assert any(run.id.encode() in name for name in names)
    ttls = {name: await redis.ttl(name) for name in names}
    assert not [name for name, ttl in ttls.items() if ttl == -1], ttls  # -2: deleted since the scan (a unit ended)
    retention = runs_fleet["settings"].run_retention
    assert 0 < ttls[keys.run(run.id).encode()] <= retention
    assert 0 < ttls[keys.units(run.id).encode()] <= retention
    assert json.loads(record_codec.unpack(await redis.get(keys.trace(run.id))))["name"] == "ROOT"  # maybe deflated
    assert 0 < ttls[keys.trace(run.id).encode()] <= retention


async def test_an_inline_run_is_recorded_and_listed(
    runs_fleet: dict[str, Any], client: RunClient, llm: ThreadedFakeLLM
) -> None:
    result, context = await run_inline(runs_fleet, R.BatchTree, batch(llm, 4))
    assert result.status is Status.OK and context.run_id
    status = await client.astatus(context.run_id)
    assert status.state is RunState.SUCCEEDED and status.mode.value == "inline" and status.progress.done == 4
    assert context.run_id in [r.id for r in await client.alist(state="succeeded", limit=200)]
    assert (await client.aresult(context.run_id)).status is Status.OK


async def test_a_large_fan_out_keeps_its_first_and_failed_children_in_memory_and_pages_the_rest(
    runs_fleet: dict[str, Any], client: RunClient, llm: ThreadedFakeLLM
) -> None:
    docs = batch(llm, 30, {"3": "fail-500", "25": "fail-500"})
    result, context = await run_inline(runs_fleet, R.BatchTree, docs, trace_fanout_max=10)
    assert result.status is Status.FAIL and docs.answers == []  # the Gather FAILed: nothing written after it
    gather = next(node for node in context.trace_root().walk() if node.kind == "Gather")
    names = sorted(int(child.name.split("_")[0]) for child in gather.child_list())
    assert names == [*range(10), 25]  # the first ten, and the failed one past them
    assert gather.paged is not None and gather.paged.count == 19 and gather.paged.total == 30
    # every child's tokens count, paged or not
    every = sum(node.total_tokens().get("total", 0) for node in gather.child_list()) + gather.paged.tokens["total"]
    assert context.trace_root().total_tokens()["total"] == every > 0
    status = await client.astatus(context.run_id)
    assert status.error is not None and "InternalServerError" in status.error.message

    stored = await client.atrace(context.run_id)
    path = ["RunBatch", "Sequence", "Gather"]
    node = stored
    for key in path:
        node = next(child for name, child in node["children"].items() if name.startswith(key) or key in name)
    assert node["paged"]["count"] == 19 and len(node["children"]) == 11
    keys_path = trace_path_to(stored, node)
    page = await client.atrace_children(context.run_id, keys_path, offset=5, limit=10)
    assert sorted(int(k.split("_")[0]) for k in page["children"]) == list(range(5, 15)) and page["next"] == 15
    assert page["children"]["12_Tree(RunDocLLM)"]["attributes"]["worker"]  # as grafted: who ran it
    last = await client.atrace_children(context.run_id, keys_path, offset=25, limit=10)
    assert last["next"] is None and len(last["children"]) == 5
    full = await client.atrace(context.run_id, full=True)
    whole = find_by_name(full, node["name"])
    assert "paged" not in whole and [int(k.split("_")[0]) for k in whole["children"]] == list(range(30))
    with pytest.raises(LookupError):
        await client.atrace_children(context.run_id, ["nowhere"])


async def test_a_result_larger_than_a_megabyte_lives_under_its_own_key_and_reads_back_whole(
    runs_fleet: dict[str, Any], client: RunClient, llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasktree_dist.runs import store as run_store

    monkeypatch.setattr(run_store, "BIG_FIELD_BYTES", 1000)  # the 40 answers' result and blackboards are bigger
    result, context = await run_inline(runs_fleet, R.BatchTree, batch(llm, 40))
    assert result.status is Status.OK
    redis = client._store().redis
    record = await redis.hgetall(keys.run(context.run_id))
    assert record[b"result"].startswith(run_store.REF.encode())  # the record itself stays small
    assert record[b"final_blackboard"].startswith(run_store.REF.encode())
    spilled = keys.run_field(context.run_id, "result")
    assert len(await redis.get(spilled)) > 3 * 1000  # written in pieces of BIG_FIELD_BYTES
    assert 0 < await redis.ttl(spilled) <= runs_fleet["settings"].run_retention
    assert (await client.aresult(context.run_id)).status is Status.OK
    docs = await client.ablackboard(context.run_id)
    assert docs.answers == [f"summary of doc{i}" for i in range(40)]


def trace_path_to(trace: dict[str, Any], target: dict[str, Any]) -> list[str]:
    stack = [([], trace)]
    while stack:
        path, node = stack.pop()
        if node is target:
            return path
        stack.extend((path + [key], child) for key, child in node.get("children", {}).items())
    raise AssertionError("not in the trace")


def find_by_name(trace: dict[str, Any], name: str) -> dict[str, Any]:
    stack = [trace]
    while stack:
        node = stack.pop()
        if node.get("name") == name:
            return node
        stack.extend(node.get("children", {}).values())
    raise AssertionError(f"{name} not in the trace")


def test_the_synchronous_client_works_outside_any_event_loop(runs_fleet: dict[str, Any]) -> None:
    with RunClient(runs_fleet["app"]) as client:
        run = client.submit(R.NapTree, R.Nap(seconds=0.01))
        assert run.result(timeout=60).status is Status.OK
        assert run.blackboard().done is True and run.status().state is RunState.SUCCEEDED
        with pytest.raises(TimeoutError):
            client.submit(R.NapTree, R.Nap(seconds=5)).result(timeout=0.2)


async def test_a_stopped_run_whose_tree_swallowed_the_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client library may turn a CancelledError into its own error on the way: the watcher stops the tree again."""
    from broker_config import TasktreeSettings
    from tasktree_dist.core.trace import TraceRoot
    from tasktree_dist.runs import scope as run_scope
    from tasktree_dist.runs.model import RunMode

    monkeypatch.setattr(run_scope, "RESTOP_S", -1.0)  # the next look re-stops at once
    stubborn_started = asyncio.Event()

    async def stubborn() -> str:
        stubborn_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # swallowed, as a library converting it would
        await asyncio.sleep(60)
        return "never"

    scope = run_scope.RunScope("r", None, "me", 1, RunMode.INLINE, False, TraceRoot(),  # type: ignore[arg-type]
                               TasktreeSettings())
    task = asyncio.ensure_future(stubborn())
    await asyncio.wait_for(stubborn_started.wait(), 5)
    scope._stop(task, "cancelled")
    await asyncio.sleep(0)
    assert not task.done() and scope.stop_reason == "cancelled"  # the first cancel was swallowed
    scope._stop(task, "cancelled")  # the watcher's next look
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
