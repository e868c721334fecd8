"""The settings (tasktree_dist.core.settings) and the Celery configuration derived from them
(tasktree_dist.distributed.celery_config), where `celery -A worker` configurations and older code import them."""

from tasktree_dist.core.settings import TasktreeSettings, get_settings
from tasktree_dist.distributed.celery_config import celery_config

__all__ = ["TasktreeSettings", "celery_config", "get_settings"]
