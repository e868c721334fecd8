"""The library's logger; set DISABLE_TASKTREE_LOGGING=1 (or the module flag) to silence it."""

from __future__ import annotations

import logging
import os

from .redact import RedactingFilter

logger = logging.getLogger("tasktree_dist")
logger.addFilter(RedactingFilter())  # URL passwords never reach a log line

DISABLE_TASKTREE_LOGGING: bool = os.environ.get("DISABLE_TASKTREE_LOGGING", "").lower() in ("1", "true", "yes", "on")
if DISABLE_TASKTREE_LOGGING:
    logger.disabled = True


def set_logging_disabled(disabled: bool = True) -> None:
    """Switch the library's logging off or on at run time."""
    global DISABLE_TASKTREE_LOGGING
    DISABLE_TASKTREE_LOGGING = disabled
    logger.disabled = disabled
