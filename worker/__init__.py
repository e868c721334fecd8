"""`celery -A worker worker` starts a tasktree_dist worker.

Configuration comes from the environment (see broker_config): TASKTREE_BROKER_URL, TASKTREE_REDIS_URL, and
TASKTREE_IMPORTS, the modules that build and register the trees this worker can run.
"""

import openai  # noqa: F401 - imported at start, so the first LLM unit does not pay it on the worker's loop

from tasktree_dist.distributed.app import create_app

app = create_app()

__all__ = ["app"]
