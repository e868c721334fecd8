"""Settings for brokers, Redis and workers, read from the environment (TASKTREE_*)."""

from .settings import TasktreeSettings, get_settings

__all__ = ["TasktreeSettings", "get_settings"]
