"""Redis Sentinel URLs: `redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>][?options]`.

Parsed here (pure: unit tested without a server) and turned into a redis-py client whose pool asks the sentinels
for the current master on every new connection: after a failover, the first command on the old master fails with a
connection error (READONLY or a refused connection) and the next one reaches the new master. The library's retry
(distributed/redis_retry.py) rides out that window like a short outage.

`rediss+sentinel://` speaks TLS to the master, the replicas and the sentinels alike. The URL's user and password
are the data nodes'; sentinels that ask for their own take `?sentinel_username=...&sentinel_password=...`. Other
query options are redis-py's (socket_timeout...), applied to the data connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from .sentinel_pools import pool_class

#: Schemes this module serves, and whether they use TLS.
SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_PORT = 26379
#: Seconds a sentinel may take to connect or answer before the next one is asked (a dead host must not hang us).
SENTINEL_TIMEOUT = 2.0
FORM = "redis+sentinel://[user:password@]host:port[,host:port...]/<master name>[/<db>]"


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: The remaining query options (redis-py's, for the data connections), as strings.
    query: dict[str, str] = field(default_factory=dict)


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES


def _shown(url: str) -> str:
    """The URL without its password, for error messages."""
    head, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{head}{sep}{userinfo.split(':', 1)[0]}:***@{hosts}"


def parse(url: str) -> SentinelURL:
    """The parts of a Sentinel URL; a ValueError naming the part that is wrong and the expected form."""

    def bad(what: str) -> ValueError:
        return ValueError(f"malformed Sentinel URL {_shown(url)!r}: {what}; expected {FORM}")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise bad(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    authority, _, tail = rest.partition("/")
    userinfo, _, hostlist = authority.rpartition("@")
    path_text, _, query_text = tail.partition("?")
    if not hostlist:
        raise bad("no sentinel host:port before the master name")
    sentinels = []
    for entry in hostlist.split(","):
        host, colon, port = entry.strip().rpartition(":") if ":" in entry else (entry.strip(), "", "")
        host = host.strip("[]")
        if not host:
            raise bad(f"sentinel {entry!r} has no host")
        if colon and not port.isdigit():
            raise bad(f"port {port!r} of sentinel {entry!r} is not a number")
        number = int(port) if colon else DEFAULT_PORT
        if not 0 < number < 65536:
            raise bad(f"port {number} of sentinel {entry!r} is out of range")
        sentinels.append((host, number))
    path = [unquote(piece) for piece in path_text.split("/")] if path_text else []
    if not path or not path[0]:
        raise bad("the master name (the first path segment) is missing")
    if len(path) > 2 or (len(path) == 2 and path[1] and not path[1].isdigit()):
        raise bad(f"the database {'/'.join(path[1:])!r} after the master name is not a number")
    query = dict(parse_qsl(query_text))
    user, _, password = userinfo.partition(":")
    return SentinelURL(
        sentinels=tuple(sentinels), master=path[0], db=int(path[1]) if len(path) == 2 and path[1] else 0,
        tls=SCHEMES[scheme.lower()], username=unquote(user) or None,
        password=unquote(password) if userinfo and ":" in userinfo else None,
        sentinel_username=query.pop("sentinel_username", None), sentinel_password=query.pop("sentinel_password", None),
        query=query,
    )


def _typed_options(parsed: SentinelURL) -> dict[str, Any]:
    """The data connections' keyword arguments: redis-py's own URL parser types the query options."""
    from redis.connection import parse_url

    auth = ""
    if parsed.username or parsed.password:
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    plain = f"{'rediss' if parsed.tls else 'redis'}://{auth}sentinel/{parsed.db}?{urlencode(parsed.query)}"
    options = parse_url(plain)
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if parsed.tls:
        options["ssl"] = True  # SentinelConnectionPool picks its TLS connection class from this
    return options


def client(url: str, *, asynchronous: bool, max_connections: int | None, pool_timeout: float | None,
           options: dict[str, Any]) -> Any:
    """A client of the master named in `url`, found through its sentinels (see the module docstring)."""
    if asynchronous:
        import redis.asyncio as redis
        from redis.asyncio.sentinel import Sentinel
    else:
        import redis  # type: ignore[no-redef]
        from redis.sentinel import Sentinel  # type: ignore[assignment]
    parsed = parse(url)
    data = {**_typed_options(parsed), **options}
    on_sentinels = {name: value for name, value in data.items() if name.startswith(("socket_", "ssl"))}
    on_sentinels.setdefault("socket_timeout", SENTINEL_TIMEOUT)
    on_sentinels.setdefault("socket_connect_timeout", SENTINEL_TIMEOUT)
    if parsed.sentinel_username:
        on_sentinels["username"] = parsed.sentinel_username
    if parsed.sentinel_password:
        on_sentinels["password"] = parsed.sentinel_password
    manager = Sentinel(list(parsed.sentinels), sentinel_kwargs=on_sentinels)
    if max_connections is None:
        return manager.master_for(parsed.master, redis_class=redis.Redis,
                                  connection_pool_class=pool_class(asynchronous, blocking=False), **data)
    return manager.master_for(parsed.master, redis_class=redis.Redis,
                              connection_pool_class=pool_class(asynchronous, blocking=True),
                              max_connections=max_connections, timeout=pool_timeout, **data)


def kombu_broker(url: str) -> tuple[str, dict[str, Any]]:
    """kombu's form of a Sentinel broker URL: `sentinel://[auth@]host:port/<db>;sentinel://...` and the transport
    options naming the master (and the sentinels' own credentials), for Celery's broker_url and
    broker_transport_options. TLS (rediss+sentinel) comes through broker_use_ssl."""
    parsed = parse(url)
    auth = ""
    if parsed.username or parsed.password:
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    hosts = ";".join(f"sentinel://{auth}{host}:{port}/{parsed.db}" for host, port in parsed.sentinels)
    on_sentinels: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT}
    if parsed.sentinel_username:
        on_sentinels["username"] = parsed.sentinel_username
    if parsed.sentinel_password:
        on_sentinels["password"] = parsed.sentinel_password
    return hosts, {"master_name": parsed.master, "sentinel_kwargs": on_sentinels}
