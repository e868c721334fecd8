"""Settings for brokers, Redis and workers, read from the environment (TASKTREE_*)."""

from .settings import TasktreeSettings, celery_config, get_settings

__all__ = ["TasktreeSettings", "celery_config", "get_settings"]
