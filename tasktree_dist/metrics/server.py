"""Serving this process's metrics over HTTP (prometheus_client's exposition server, a daemon thread).

A worker is one process (its units run on one event loop behind a threads pool), so each process serves its own
registry: no multiprocess mode. TASKTREE_METRICS_PORT says where: `0` (the default) serves nothing, `9100` that
port, `9100-9199` the first free port of the range (N workers on one host), `auto` any free port. The address is
published in the process's heartbeat info, so `tasktree metrics --targets` lists every live endpoint for
Prometheus. TASKTREE_METRICS_HOST is 127.0.0.1 by default: metrics name trees and models.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from ..core.log import logger

_lock = threading.Lock()
_address: tuple[str, int] | None = None
#: The host others reach this process at when it binds every interface (see advertised_host).
_advertised: str | None = None


class MetricsPortError(ValueError):
    """TASKTREE_METRICS_PORT is not 0, a port, a range `low-high` or `auto`."""


def parse_port_spec(spec: str | int) -> list[int]:
    """The ports to try, in order: [] for off, [0] for any free port."""
    text = str(spec).strip().lower()
    if text in ("", "0", "off"):
        return []
    if text == "auto":
        return [0]
    low_text, _, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text or low_text)
    except ValueError:
        raise MetricsPortError(f"TASKTREE_METRICS_PORT={spec!r}: use 0 (off), a port, low-high or auto") from None
    if not 1 <= low <= high <= 65535:
        raise MetricsPortError(f"TASKTREE_METRICS_PORT={spec!r}: ports must be 1-65535, low <= high")
    return list(range(low, high + 1))


def start_metrics_server(settings: Any = None, *, port: str | int | None = None, host: str | None = None) -> (
    tuple[str, int] | None
):
    """Serve the default registry on the configured port (once per process; later calls return the address).
    Returns (host, port), or None when metrics are off. A range with no free port logs an error and serves none."""
    global _address, _advertised
    spec = port if port is not None else getattr(settings, "metrics_port", "0")
    bind = host or getattr(settings, "metrics_host", "127.0.0.1")
    with _lock:
        if _address is not None:
            return _address
        candidates = parse_port_spec(spec)
        if not candidates:
            return None
        from prometheus_client import start_http_server

        for candidate in candidates:
            try:
                server, _thread = start_http_server(candidate, addr=bind)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            _address = (bind, int(server.server_port))
            _advertised = advertised_host(bind, getattr(settings, "redis_url", ""))
            logger.info("metrics on http://%s:%d/metrics", *_address)
            return _address
        logger.error("no free port in TASKTREE_METRICS_PORT=%s on %s: this process serves no metrics", spec, bind)
        return None


def advertised_host(bind: str, redis_url: str) -> str:
    """The host part of the address published for scraping. A specific bind address is published as is. Bound to
    every interface, the address this host uses to reach Redis is published: a Prometheus wherever the fleet's
    Redis is reachable reaches it too, where a host name resolves only with DNS for every host. The host name
    remains the fallback: no route, a unix socket URL, or Redis on this host's loopback (which says nothing of
    how other hosts reach this one)."""
    if bind not in ("0.0.0.0", "::", ""):
        return bind
    outward = outward_address(redis_url)
    if outward is None or ipaddress.ip_address(outward.split("%")[0]).is_loopback:
        return socket.gethostname()
    return outward


def outward_address(url: str) -> str | None:
    """The local address of the route to `url`'s (first) host: connecting a UDP socket sends nothing, it only asks
    the kernel which interface it would use. None when the URL names no network host or there is no route."""
    first = urlsplit(url).netloc.rpartition("@")[2].split(",")[0]  # a sentinel or cluster URL lists several
    try:
        target = urlsplit(f"//{first}")
        host, port = target.hostname, target.port or 6379
        if not host:
            return None
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return str(probe.getsockname()[0])
    except (OSError, ValueError):
        return None


def metrics_address() -> str | None:
    """`host:port` others can scrape this process at (see advertised_host), or None."""
    if _address is None:
        return None
    host = _advertised or _address[0]
    port = _address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
