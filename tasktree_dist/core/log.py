"""The library's logger; DISABLE_TASKTREE_LOGGING=1 (a field of the settings) or set_logging_disabled() silence it.

`tasktree_dist.DISABLE_TASKTREE_LOGGING` is a live view of the flag below (core.aliases), as in tinytasktree:
reading it tells the current state, assigning it switches logging, and the logger consults it on every record.
"""

from __future__ import annotations

import logging

from .redact import RedactingFilter
from .settings import get_settings

logger = logging.getLogger("tasktree_dist")
logger.addFilter(RedactingFilter())  # URL passwords never reach a log line

DISABLE_TASKTREE_LOGGING: bool = get_settings().disable_logging
logger.disabled = DISABLE_TASKTREE_LOGGING


def _enabled(_record: logging.LogRecord) -> bool:
    return not DISABLE_TASKTREE_LOGGING


logger.addFilter(_enabled)


def set_logging_disabled(disabled: bool = True) -> None:
    """Switch the library's logging off or on at run time."""
    global DISABLE_TASKTREE_LOGGING
    DISABLE_TASKTREE_LOGGING = logger.disabled = disabled
