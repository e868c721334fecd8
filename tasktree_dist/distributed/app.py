"""Building a Celery app wired to tasktree_dist (used by `worker/` and by coordinators)."""

from __future__ import annotations

from celery import Celery

from broker_config import TasktreeSettings, celery_config, get_settings

from .tasks import register_tasks


def create_app(settings: TasktreeSettings | None = None, name: str = "tasktree_dist") -> Celery:
    settings = settings or get_settings()
    app = Celery(name)
    app.config_from_object(celery_config(settings))
    app.tasktree_settings = settings  # type: ignore[attr-defined]
    register_tasks(app)
    return app
