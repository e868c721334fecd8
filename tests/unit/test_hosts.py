"""What a process publishes about itself holds across hosts: its metrics address others can reach, an identity no
other host's process shares; and the namespace hosts' tests say why they cannot run (pure logic, no subprocess but
the `ip` probe when root)."""

from __future__ import annotations

import socket

import pytest

from tasktree_dist.distributed.liveness import new_process_id
from tasktree_dist.metrics.server import advertised_host, outward_address
from tasktree_dist.testing import netns


def test_a_specific_bind_address_is_published_as_is() -> None:
    assert advertised_host("10.0.0.5", "redis://10.9.9.9:6379/0") == "10.0.0.5"


def test_bound_to_every_interface_the_address_towards_redis_is_published(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the host name: another host resolves it only with DNS for every host (namespaces, bare VMs have none)."""
    asked: list[str] = []

    def towards(url: str) -> str:
        asked.append(url)
        return "10.231.0.2"

    monkeypatch.setattr("tasktree_dist.metrics.server.outward_address", towards)
    assert advertised_host("0.0.0.0", "redis://:pw@10.231.0.1:6379/1") == "10.231.0.2"
    assert asked == ["redis://:pw@10.231.0.1:6379/1"]


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/1", "unix:///run/redis.sock", "redis://nohost.invalid/0"])
def test_the_host_name_is_the_fallback_when_the_route_says_nothing_of_other_hosts(url: str) -> None:
    assert advertised_host("0.0.0.0", url) == socket.gethostname()


def test_the_route_lookup_reads_the_first_host_of_any_redis_url() -> None:
    assert outward_address("redis://127.0.0.1:6379/0") == "127.0.0.1"
    assert outward_address("rediss://user:secret@127.0.0.1/0") == "127.0.0.1"
    assert outward_address("redis+sentinel://127.0.0.1:26379,127.0.0.2:26379/mymaster/0") == "127.0.0.1"
    assert outward_address("unix:///run/redis.sock") is None


def test_process_ids_are_unique_even_for_same_named_hosts_and_pids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts may share a host name (cloned VMs, containers with a fixed hostname) and a pid (1 in containers):
    the random tag keeps their heartbeats, unit owners and run owners apart."""
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    monkeypatch.setattr("os.getpid", lambda: 1)
    ids = {new_process_id("w1@localhost") for _ in range(20_000)}
    assert len(ids) == 20_000 and all(i.startswith("w1@localhost:1:") for i in ids)


def test_namespace_hosts_say_why_they_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "need root" in (netns.namespaces_unavailable() or "")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "unshare" else "/usr/bin/" + tool)
    assert "unshare not installed" in (netns.namespaces_unavailable() or "")
