"""Building a Celery app wired to tasktree_dist (used by `worker/` and by coordinators)."""

from __future__ import annotations

from urllib.parse import urlsplit

from celery import Celery

from ..core.sentinel import is_sentinel
from ..core.settings import TasktreeSettings, get_settings
from .celery_config import celery_config
from .tasks import register_tasks

#: The worker's consumer: refuses malformed messages instead of dying on them (see poison.py).
GUARDED_CONSUMER = "tasktree_dist.distributed.poison:GuardedConsumer"
#: kombu's Redis transport, skipping a message whose envelope it cannot read instead of raising (poison.py).
GUARDED_REDIS_TRANSPORT = "tasktree_dist.distributed.poison:RedisTransport"
#: The same for a broker found through Redis Sentinel (TASKTREE_BROKER_URL=redis+sentinel://...).
GUARDED_SENTINEL_TRANSPORT = "tasktree_dist.distributed.poison:SentinelTransport"


def create_app(settings: TasktreeSettings | None = None, name: str = "tasktree_dist") -> Celery:
    settings = settings or get_settings()
    app = Celery(name)
    app.config_from_object(celery_config(settings))
    app.conf.worker_consumer = GUARDED_CONSUMER
    if all(urlsplit(url).scheme in ("redis", "rediss") for url in settings.broker_url.split(";")):
        app.conf.broker_transport = GUARDED_REDIS_TRANSPORT
    elif is_sentinel(settings.broker_url):
        app.conf.broker_transport = GUARDED_SENTINEL_TRANSPORT
    app.tasktree_settings = settings  # type: ignore[attr-defined]
    register_tasks(app)
    return app
