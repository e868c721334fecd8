"""The `tasktree` command: submit, watch, cancel and retry runs, read their traces, serve the runs board and the
fleet's metrics. Built for people (rich tables, progress bars) and scripts (`--json`, exit codes):

    0  done / the run succeeded          3  timed out waiting (the run goes on)
    1  the run failed or was cancelled   4  Redis or the broker unreachable
    2  bad input: unknown run or tree, blackboard that does not fit, wrong state for the operation
"""

from . import specs as _specs  # noqa: F401 - registers validate, schema and run on the command group
from .main import cli, main

__all__ = ["cli", "main"]
