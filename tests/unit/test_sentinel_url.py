"""Sentinel URLs (core/sentinel.py): parts parsed, malformed ones refused naming the part, clients built without a
server (redis-py connects lazily)."""

from __future__ import annotations

import pytest

from tasktree_dist.core import sentinel
from tasktree_dist.core.redis_client import connect


def test_hosts_master_database_and_credentials_are_parsed() -> None:
    parsed = sentinel.parse("redis+sentinel://app:s%40cret@h1:26380,h2,10.0.0.3:5000/mymaster/3?socket_timeout=4"
                            "&sentinel_password=sp")
    assert parsed.sentinels == (("h1", 26380), ("h2", 26379), ("10.0.0.3", 5000))
    assert (parsed.master, parsed.db, parsed.tls) == ("mymaster", 3, False)
    assert (parsed.username, parsed.password, parsed.sentinel_password) == ("app", "s@cret", "sp")
    assert parsed.query == {"socket_timeout": "4"}


def test_database_defaults_to_zero_and_tls_follows_the_scheme() -> None:
    parsed = sentinel.parse("rediss+sentinel://:pw@h1:26379/cache/")
    assert (parsed.master, parsed.db, parsed.tls, parsed.username, parsed.password) == ("cache", 0, True, None, "pw")


@pytest.mark.parametrize(("url", "named"), [
    ("redis+sentinel:///mymaster/0", "no sentinel host:port"),
    ("redis+sentinel://h1:26379", "master name"),
    ("redis+sentinel://h1:26379/", "master name"),
    ("redis+sentinel://h1:x/mymaster", "port 'x' of sentinel 'h1:x'"),
    ("redis+sentinel://h1:26379,:26380/mymaster", "sentinel ':26380' has no host"),
    ("redis+sentinel://h1:70000/mymaster", "port 70000"),
    ("redis+sentinel://h1/mymaster/one", "database 'one'"),
    ("redis+sentinel://h1/mymaster/1/2", "database '1/2'"),
])
def test_a_malformed_url_names_the_wrong_part_and_hides_the_password(url: str, named: str) -> None:
    with pytest.raises(ValueError, match="malformed Sentinel URL") as caught:
        sentinel.parse(url.replace("://", "://u:topsecret@"))
    assert named in str(caught.value) and "topsecret" not in str(caught.value)
    assert "redis+sentinel://[user:password@]host:port" in str(caught.value)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_connect_gives_a_master_client_with_a_blocking_pool(asynchronous: bool) -> None:
    client = connect("redis+sentinel://:pw@h1:26379,h2:26380/mymaster/2?socket_timeout=3", asynchronous=asynchronous,
                     max_connections=7, pool_timeout=5)
    pool = client.connection_pool
    assert (pool.service_name, pool.is_master, pool.max_connections, pool.timeout) == ("mymaster", True, 7, 5)
    assert "BlockingConnectionPool" in [cls.__name__ for cls in type(pool).__mro__]
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "pw")
    assert pool.connection_kwargs["socket_timeout"] == 3.0
    manager = pool.sentinel_manager
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in manager.sentinels] == [("h1", 26379), ("h2", 26380)]
    # the sentinels get no password of the data nodes, but timeouts so a dead one cannot hang a process
    assert "password" not in manager.sentinel_kwargs
    assert (manager.sentinel_kwargs["socket_timeout"], manager.sentinel_kwargs["socket_connect_timeout"]) == (
        3.0, sentinel.SENTINEL_TIMEOUT)


def test_connect_without_a_pool_size_uses_the_plain_sentinel_pool() -> None:
    client = connect("redis+sentinel://h1/mymaster", asynchronous=False)
    assert "SentinelConnectionPool" in [cls.__name__ for cls in type(client.connection_pool).__mro__]
    assert "BlockingConnectionPool" not in [cls.__name__ for cls in type(client.connection_pool).__mro__]


def test_settings_refuse_a_malformed_sentinel_state_url_and_add_tls_files_to_a_tls_one() -> None:
    from pydantic import ValidationError

    from tasktree_dist.core.settings import TasktreeSettings

    with pytest.raises(ValidationError, match="TASKTREE_REDIS_URL: malformed Sentinel URL .*master name"):
        TasktreeSettings(redis_url="redis+sentinel://h1:26379/")
    url = TasktreeSettings(redis_url="rediss+sentinel://h1,h2/m/1", ssl_ca_certs="/ca.pem").redis_url
    assert sentinel.parse(url).query == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}


def test_a_sentinel_broker_becomes_kombus_sentinel_transport_with_the_master_in_its_options() -> None:
    from tasktree_dist.core.settings import TasktreeSettings
    from tasktree_dist.distributed.app import GUARDED_SENTINEL_TRANSPORT, create_app
    from tasktree_dist.distributed.celery_config import celery_config

    settings = TasktreeSettings(broker_url="redis+sentinel://:pw@h1:26379,h2:26380/broker/2?sentinel_password=sp")
    config = celery_config(settings)
    assert config["broker_url"] == "sentinel://:pw@h1:26379/2;sentinel://:pw@h2:26380/2"
    options = config["broker_transport_options"]
    assert options["master_name"] == "broker" and options["sentinel_kwargs"]["password"] == "sp"
    assert "broker_use_ssl" not in config
    assert create_app(settings).conf.broker_transport == GUARDED_SENTINEL_TRANSPORT
    tls = celery_config(TasktreeSettings(broker_url="rediss+sentinel://h1/broker", ssl_ca_certs="/ca.pem"))
    assert tls["broker_use_ssl"]["ssl_ca_certs"] == "/ca.pem"
    with pytest.raises(ValueError, match="TASKTREE_BROKER_URL: malformed Sentinel URL .*master name"):
        TasktreeSettings(broker_url="redis+sentinel://h1:26379")
