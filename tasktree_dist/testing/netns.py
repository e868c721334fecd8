"""Hosts made of Linux network namespaces, for tests of a fleet spread over several machines (needs root).

Each host is a namespace with its own loopback, one address on a private /24 and, for the processes started in
it, its own host name (a UTS namespace). The hosts meet on a bridge inside the first host's namespace, so nothing
is added to the machine's own network: two test sessions running at once (other helpers, CI shards) never see
each other's links, and the namespace names carry the test process's pid. `cut`/`mend` take a host's link down
and up, as a pulled cable or a partition would. The test process itself can act as one host: `in_host` runs a
function on a thread that entered that host's network namespace (every socket it opens lives there).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
#: Addresses of the private network (every namespace has its own stack: the same subnet in two labs never clashes).
SUBNET = "10.231.0"
_labs = itertools.count()


def namespaces_unavailable() -> str | None:
    """Why this process cannot build namespace hosts (not root, no `ip`/`unshare`, no netns support), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add): run as root, as CI does"
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2, util-linux)"
    # everything a lab needs, tried once: namespaces, a bridge, a veth pair, a UTS namespace (a container without
    # CAP_SYS_ADMIN, or a kernel without veth, fails one of them)
    probe = NetLab(("hub", "peer"))
    try:
        probe.start()
        done = probe.run("peer", ["true"], timeout=20)
        if done.returncode != 0:
            return f"cannot start a process in a namespace host: {done.stderr.strip() or done.returncode}"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot build namespace hosts here: {exc}"
    finally:
        probe.stop()
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One namespace host: `netns` (its namespace), `hostname` (what its processes see), `address`."""

    role: str
    netns: str
    hostname: str
    address: str
    #: The bridge-side end of its link (in the hub's namespace); the hub itself has none.
    port: str = ""

    def command(self, args: list[str]) -> list[str]:
        """`args` run inside this host: its network namespace and, in a UTS namespace of its own, its host name."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.hostname, *args]


@dataclass
class NetLab:
    """Hosts named by `roles` (the first is the hub: the bridge lives in its namespace), built by `start()` and
    removed by `stop()` (stop the processes started in them first)."""

    roles: tuple[str, ...]
    hosts: dict[str, Host] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: f"tt{os.getpid()}x{next(_labs)}")

    def start(self) -> NetLab:
        try:
            for index, role in enumerate(self.roles, start=1):
                host = Host(role, f"{self.tag}-{role}", f"{role}-{self.tag}", f"{SUBNET}.{index}")
                _ip("netns", "add", host.netns)
                self.hosts[role] = host
                _ip("-n", host.netns, "link", "set", "lo", "up")
            hub = self.hub
            _ip("-n", hub.netns, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub.netns, "addr", "add", f"{hub.address}/24", "dev", "br0")
            _ip("-n", hub.netns, "link", "set", "br0", "up")
            for index, host in enumerate(list(self.hosts.values())[1:], start=2):
                host.port = f"v{index}"
                _ip("link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", host.port, "netns",
                    hub.netns)
                _ip("-n", hub.netns, "link", "set", host.port, "master", "br0")
                _ip("-n", hub.netns, "link", "set", host.port, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
        except Exception:
            self.stop()
            raise
        return self

    @property
    def hub(self) -> Host:
        return self.hosts[self.roles[0]]

    def cut(self, role: str) -> None:
        """Take the host's link down (on its own side): its connections stall, nothing is closed or reset."""
        _ip("-n", self.hosts[role].netns, "link", "set", "eth0", "down")

    def mend(self, role: str) -> None:
        _ip("-n", self.hosts[role].netns, "link", "set", "eth0", "up")

    def spawn(self, role: str, args: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        """Start `args` in host `role` (`ip netns exec` and `unshare` exec into it: the Popen's pid is its own)."""
        with open(log, "wb") as out:
            return subprocess.Popen(self.hosts[role].command(args), env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT)

    def run(self, role: str, args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `args` to completion in host `role` (a CLI command from that host), output captured."""
        return subprocess.run(self.hosts[role].command(args), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def in_host(self, role: str, fn: Callable[[], T], timeout: float = 300.0) -> T:
        """`fn()` on a thread inside host `role`'s network namespace; its result, or its exception raised here."""
        outcome: dict[str, Any] = {}

        def enter_and_call() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.hosts[role].netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.hosts[role].netns}")
                finally:
                    os.close(fd)
                outcome["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=enter_and_call, name=f"in-{role}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"work in host {role} did not finish within {timeout}s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def stop(self) -> None:
        """Delete the namespaces (their links go with them); safe to call twice or after a failed start."""
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        self.hosts.clear()

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
