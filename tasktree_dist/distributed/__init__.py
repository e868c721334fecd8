"""Distributed execution over Celery workers and Redis: `Context(executor=CeleryExecutor(app))`."""

from .app import create_app
from .changes import BlackboardConflictError
from .executor import CeleryExecutor, DispatchError

__all__ = ["BlackboardConflictError", "CeleryExecutor", "DispatchError", "create_app"]
