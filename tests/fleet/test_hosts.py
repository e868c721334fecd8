"""A fleet over four hosts made of network namespaces (root only; `pytest -m hosts`): Redis (broker and state) on
one, a worker (units and run coordinators) on each of alpha and beta, each with its own address and host name, and
runs submitted from a fourth. Host alpha, coordinating a run and holding some of its units, is cut off (link
down) mid-run: once its heartbeat lapses beta takes the run over by replay and receives alpha's units; the run
completes with every result applied once; metrics targets and `tasktree workers` show both hosts; alpha's link
comes back and its worker serves again. Only loopback and the namespaces' own addresses are used."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist.testing.fleet import REPO_ROOT, WorkerProcess, fleet_env, fleet_settings, temp_log, wait_until_ready
from tasktree_dist.testing.netns import NetLab, namespaces_unavailable
from tasktree_dist.testing.redis_server import stop_process, wait_for_port
from tests import host_trees as H
from tests.helpers import eventually
from tests.ops_fleet import tasktree_command

pytestmark = [pytest.mark.hosts, pytest.mark.timeout(180)]

TTL = 2.0
PIECES = 24
REDIS_PORT = 6379
WORKERS = ("alpha", "beta")
RUNS_QUEUE = "tasktree.runs"


@pytest.fixture
def lab() -> Iterator[dict[str, Any]]:
    """The four hosts, Redis on `redis`, a worker on each of alpha and beta; everything stopped by PID and the
    namespaces deleted on the way out, whatever happened."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    net = NetLab(("redis", *WORKERS, "client"))
    directory = tempfile.mkdtemp(prefix="tasktree-hosts-")
    redis = None
    workers: list[WorkerProcess] = []
    try:
        net.start()
        hub, password = net.hub.address, uuid.uuid4().hex  # off loopback, Redis serves only with a password
        redis = net.spawn("redis", [
            shutil.which("redis-server") or "redis-server", "--port", str(REDIS_PORT), "--bind", hub,
            "--requirepass", password, "--dir", directory, "--save", "", "--appendonly", "no",
            "--logfile", os.path.join(directory, "redis.log"),
        ], temp_log("hosts-redis"))
        net.in_host("client", lambda: wait_for_port(hub, REDIS_PORT, process=redis))
        url = f"redis://:{password}@{hub}:{REDIS_PORT}"
        env = fleet_env(f"{url}/0", f"{url}/1", "tests.host_trees",
                        TASKTREE_LEASE_TTL=str(TTL), TASKTREE_BATCH_SIZE="1", TASKTREE_METRICS_PORT="9100-9199",
                        TASKTREE_METRICS_HOST="0.0.0.0")
        settings = fleet_settings(env, lease_ttl=TTL)
        for role in WORKERS:
            worker = WorkerProcess(role, env, queues=f"tasktree,tasktree.runs,{role}", concurrency=PIECES + 8,
                                   prefix=tuple(net.hosts[role].command([])))
            workers.append(worker.start())
        yield {"net": net, "env": env, "settings": settings, "workers": dict(zip(WORKERS, workers, strict=True))}
    finally:
        for worker in workers:
            worker.stop()
        stop_process(redis, timeout=5)
        net.stop()
        shutil.rmtree(directory, ignore_errors=True)


def cli(lab: dict[str, Any], *args: str, parse: bool = True) -> Any:
    """`tasktree ARGS` run on the client host: its JSON output (its text when not `parse`)."""
    env = {**lab["env"], "COLUMNS": "400"}  # a wide terminal: the table's cells are not folded
    done = lab["net"].run("client", [*tasktree_command(), *args], env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if parse else done.stdout


def listed(lab: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`tasktree workers` from the client host: live worker processes by the host they run on."""
    return {info["host"]: info for info in cli(lab, "workers", "--json") if info.get("role") == "worker"}


def test_a_fleet_over_hosts_survives_a_host_cut_off_mid_run(lab: dict[str, Any]) -> None:
    net, workers = lab["net"], lab["workers"]
    host = {role: net.hosts[role].hostname for role in WORKERS}

    def from_the_client_host() -> None:
        from tasktree_dist.distributed import create_app

        app = create_app(lab["settings"])
        wait_until_ready(app, list(workers.values()), timeout=60)
        asyncio.run(scenario(lab, app, host))

    net.in_host("client", from_the_client_host)


async def scenario(lab: dict[str, Any], app: Any, host: dict[str, str]) -> None:
    from tasktree_dist import RunClient, Status

    net, workers = lab["net"], lab["workers"]
    logs = lambda: "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in workers.values())  # noqa: E731

    # Both hosts are listed by their own host names, each serving metrics at its own address on the network.
    processes = await asyncio.to_thread(listed, lab)
    assert set(processes) == set(host.values()), processes
    for role, info in ((role, processes[host[role]]) for role in WORKERS):
        assert info["process"].startswith(f"{role}@{host[role]}:") and info["metrics"].startswith(
            net.hosts[role].address + ":"), info
    table = await asyncio.to_thread(cli, lab, "workers", parse=False)
    for role in WORKERS:
        [line] = [line for line in table.splitlines() if f"{role}@" in line]
        assert f" {host[role]} " in line and f" {net.hosts[role].address}:" in line, table
    targets = await asyncio.to_thread(cli, lab, "metrics", "--targets")
    scraped = {t["targets"][0] for t in targets} & {info["metrics"] for info in processes.values()}
    assert len(scraped) == 2, targets
    for target in scraped:
        body = await asyncio.to_thread(_get, f"http://{target}/metrics")
        assert "# HELP tasktree_" in body, body[:500]

    client = RunClient(app)
    redis = client._store().redis
    go_key = f"hosts:go:{uuid.uuid4().hex}"
    try:
        # alpha coordinates the run (beta reads no runs queue while it is submitted, and supervises all along)
        beta_node = [f"beta@{host['beta']}"]
        assert app.control.cancel_consumer(RUNS_QUEUE, destination=beta_node, reply=True, timeout=10), "no reply"
        run = await client.asubmit(H.JobTree, H.Job(count=PIECES, go_key=go_key))
        coordinator = await eventually(lambda: _coordinator(client, run.id), "a coordinator", within=30, detail=logs)
        assert coordinator.startswith(f"alpha@{host['alpha']}:"), coordinator
        assert app.control.add_consumer(RUNS_QUEUE, destination=beta_node, reply=True, timeout=10), "no reply"
        # every piece received somewhere (they wait for the go key), some of them on alpha
        await eventually(lambda: _owners(redis, host, want={"alpha": 1, "beta": 1}, total=PIECES),
                         "pieces held by both hosts", within=40, detail=logs)
        net.cut("alpha")
        cut_at = time.monotonic()
        # alpha's heartbeat lapses: its pieces are sent again and beta receives every one of them
        await eventually(lambda: _owners(redis, host, want={"beta": PIECES}, total=PIECES),
                         "alpha's pieces re-sent to beta", within=TTL + 30, detail=logs)
        await redis.set(go_key, "1", ex=300)
        result = await run.aresult(timeout=60)
        status = await run.astatus()
        assert result.status is Status.OK, (status.error, logs())
        expected = [f"piece{i}@{host['beta']}" for i in range(PIECES)]
        assert (await run.ablackboard()).results == expected
        assert status.progress.done == PIECES and status.progress.failed == 0, status.progress
        children = _gather_children(await run.atrace())
        assert len(children) == PIECES
        lost = [c["attributes"] for c in children if c["attributes"].get("lost_workers")]
        assert len(lost) >= 2 and all(a["dispatches"] == 2 for a in lost), lost
        assert all(f"alpha@{host['alpha']}:" in str(a["lost_workers"]) for a in lost), lost
        assert all(str(c["attributes"]["worker"]).startswith("beta@") for c in children)
        states = [e.data async for e in run.events(follow=False) if e.type == "state"]
        resumed = [d for d in states if str(d.get("resumed_from", "")).startswith(f"alpha@{host['alpha']}:")]
        assert resumed and str(resumed[0]["coordinator"]).startswith(f"beta@{host['beta']}:"), states

        # alpha comes back: its worker (the same process) beats again, and is given work only it serves
        net.mend("alpha")
        assert workers["alpha"].process is not None and workers["alpha"].process.poll() is None, logs()
        await eventually(lambda: _listed_again(lab, host["alpha"]), "alpha listed again after its link came back",
                         within=60, detail=logs)
        on_alpha = await client.asubmit(H.OnAlpha, H.Where())
        assert (await on_alpha.aresult(timeout=60)).data == host["alpha"], logs()
        # the pieces alpha still held finish there now; what they record changes nothing of the finished run
        await eventually(lambda: _idle(lab, host["alpha"]), "alpha done with its stale pieces", within=30,
                         detail=logs)
        assert (await run.ablackboard()).results == expected
        assert (await run.astatus()).progress.done == PIECES
        assert all(w.process is not None and w.process.poll() is None for w in workers.values()), logs()
        assert time.monotonic() - cut_at < 120
    finally:
        await client.aclose()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def _owners(redis: Any, host: dict[str, str], want: dict[str, int], total: int) -> dict[str, int] | None:
    """Counts of unit owner keys by worker role once `total` units are owned and each role owns at least its `want`
    (owners are process ids `role@hostname:pid:tag`)."""
    from tasktree_dist.distributed import keys

    owners = [await redis.get(name) async for name in redis.scan_iter(match=f"{keys.PREFIX}:owner:*")]
    counts = {role: sum(1 for o in owners if o and o.decode().startswith(f"{role}@{host[role]}:")) for role in host}
    enough = sum(counts.values()) >= total and all(counts[role] >= n for role, n in want.items())
    return counts if enough else None


def _gather_children(trace: dict[str, Any]) -> list[dict[str, Any]]:
    gather = trace["children"]["Tree(HostsJob)"]["children"]["Sequence"]["children"]["Gather"]["children"]
    return list(gather.values())


async def _coordinator(client: Any, run_id: str) -> str | None:
    return (await client.astatus(run_id)).coordinator


async def _listed_again(lab: dict[str, Any], hostname: str) -> bool:
    return hostname in await asyncio.to_thread(listed, lab)


async def _idle(lab: dict[str, Any], hostname: str) -> bool:
    info = (await asyncio.to_thread(listed, lab)).get(hostname)
    return info is not None and int(info.get("running") or 0) == 0


if sys.platform != "linux":  # pragma: no cover - namespaces are Linux's
    pytestmark.append(pytest.mark.skip(reason="network namespaces are a Linux feature"))
