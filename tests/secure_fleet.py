"""A fleet on a TLS-only redis-server with the ACL users of docs/security.md, read from the page itself (so the
documented rules are the tested ones): workers connect as tasktree-worker, the test's application as
tasktree-coordinator, a board as tasktree-board; the harness pings workers as the administrator."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tasktree_dist.testing.fleet import REPO_ROOT, fleet_env
from tasktree_dist.testing.secure_redis import ADMIN_USER, SecureRedisServer, tls_available

PASSWORDS = {"worker": "w-" + os.urandom(8).hex(), "coordinator": "c-" + os.urandom(8).hex(),
             "board": "b-" + os.urandom(8).hex()}


def documented_acl() -> str:
    """The ACL lines of docs/security.md (the fenced block after the acl-rules marker), with test passwords."""
    text = (REPO_ROOT / "docs" / "security.md").read_text()
    found = re.search(r"<!-- acl-rules:.*?-->\s*```text\n(.*?)```", text, re.S)
    assert found, "docs/security.md lost its ACL block"
    rules = found.group(1)
    for role, password in PASSWORDS.items():
        rules = rules.replace(f">{role.upper()}_PASSWORD", f">{password}")
    return rules


@contextmanager
def secure_redis() -> Iterator[SecureRedisServer]:
    """The server, with TASKTREE_SSL_* set in this process too (its own settings read them), restored after."""
    reason = tls_available()
    if reason is not None:
        pytest.skip(f"TLS Redis tests skipped: {reason}")
    with SecureRedisServer(documented_acl()) as server:
        saved = {name: os.environ.get(name) for name in server.ssl_env()}
        os.environ.update(server.ssl_env())
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def role_env(server: SecureRedisServer, role: str, broker_db: int, runs_db: int, **extra: str) -> dict[str, str]:
    """The environment of a process in `role` (worker, coordinator, board): its user in both URLs, the TLS files."""
    user, password = (ADMIN_USER, server.admin_password) if role == "admin" else (f"tasktree-{role}",
                                                                                 PASSWORDS[role])
    return fleet_env(server.url(user, password, broker_db), server.url(user, password, runs_db), "tests.run_trees",
                     **server.ssl_env(), **extra)


def role_app(server: SecureRedisServer, role: str, broker_db: int, runs_db: int, **overrides: Any) -> Any:
    from tasktree_dist.distributed import create_app
    from tasktree_dist.testing.fleet import fleet_settings

    return create_app(fleet_settings(role_env(server, role, broker_db, runs_db), **overrides))


@contextmanager
def secure_workers(server: SecureRedisServer, name: str, broker_db: int, runs_db: int, concurrency: int = 32,
                   **extra: str) -> Iterator[list[Any]]:
    """Two workers `{name}1`, `{name}2` as tasktree-worker, pinged ready as the administrator; stopped by PID."""
    from tasktree_dist.testing.fleet import WorkerProcess, running_workers

    env = role_env(server, "worker", broker_db, runs_db, **extra)
    workers = [WorkerProcess(f"{name}{i}", env, concurrency=concurrency) for i in (1, 2)]
    with running_workers(role_app(server, "admin", broker_db, runs_db), workers):
        yield workers
