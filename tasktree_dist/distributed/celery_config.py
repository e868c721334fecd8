"""Celery's configuration, derived from the settings: JSON only (never pickle), task events on, defaults suited to
I/O-bound LLM work."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from kombu import Exchange, Queue

from ..core import sentinel
from ..core.settings import TasktreeSettings


def celery_config(settings: TasktreeSettings) -> dict[str, Any]:
    """Celery settings: JSON only (never pickle), task events on, defaults suited to I/O-bound LLM work."""
    return {
        **_broker(settings.broker_url),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": settings.queue,
        # `celery -A worker worker` serves units and run coordinators alike unless -Q says otherwise
        "task_queues": tuple(
            Queue(name, Exchange(name), routing_key=name) for name in (settings.queue, settings.runs_queue)
        ),
        "task_routes": {"tasktree.coordinate": {"queue": settings.runs_queue}},
        "task_create_missing_queues": True,
        "task_acks_late": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        # One process, many threads, each waiting on units that run concurrently on the process's event loop.
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "imports": settings.import_list,
        **_broker_tls(settings),
    }


def _broker(url: str) -> dict[str, Any]:
    """The broker's URL for kombu: a Sentinel URL (redis+sentinel://h1:26379,h2/<master>/<db>) becomes kombu's
    sentinel transport (`sentinel://h1:26379/<db>;sentinel://...`) with the master's name in its options."""
    if not sentinel.is_sentinel(url):
        return {"broker_url": url}
    try:
        kombu_url, options = sentinel.kombu_broker(url)
    except ValueError as exc:
        raise ValueError(f"TASKTREE_BROKER_URL: {exc}") from None
    return {"broker_url": kombu_url, "broker_transport_options": options}


def _broker_tls(settings: TasktreeSettings) -> dict[str, Any]:
    """Celery's TLS options for a rediss:// broker (kombu would otherwise connect without checking the server)."""
    schemes = {urlsplit(url).scheme for url in settings.broker_url.split(";")}
    if not schemes & {"rediss", "rediss+sentinel"}:
        return {}
    options: dict[str, Any] = {**settings.ssl_options(), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return {"broker_use_ssl": options, "redis_backend_use_ssl": options}
