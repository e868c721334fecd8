"""URL passwords and secret query arguments masked in URLs, free text, log records, run errors and traces."""

from __future__ import annotations

import logging

import pytest

from tasktree_dist.core.log import logger
from tasktree_dist.core.redact import redact_text, redact_url
from tasktree_dist.core.trace import TraceNode
from tasktree_dist.runs.model import RunError


@pytest.mark.parametrize(("url", "shown"), [
    ("rediss://worker:s3cret@redis:6380/1", "rediss://worker:***@redis:6380/1"),
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("https://proxy.example/v1?api_key=s3cret&model=x", "https://proxy.example/v1?api_key=***&model=x"),
    ("rediss://u:s3cret@h:1/0?ssl_keyfile=/k.pem", "rediss://u:***@h:1/0?ssl_keyfile=/k.pem"),
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("gpt-4o-mini", "gpt-4o-mini"),
])
def test_urls(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_text_logs_run_errors_and_traces(caplog: pytest.LogCaptureFixture) -> None:
    text = "Error connecting to rediss://worker:s3cret@redis:6380/1 (see https://x.example/?token=abc123)"
    assert redact_text(text) == ("Error connecting to rediss://worker:***@redis:6380/1 "
                                 "(see https://x.example/?token=***)")
    with caplog.at_level(logging.WARNING, logger="tasktree_dist"):
        logger.warning("cannot reach %s", "redis://:s3cret@h:1/0")
    assert "s3cret" not in caplog.text and "redis://:***@h:1/0" in caplog.text
    assert "s3cret" not in RunError(message=text).message
    node = TraceNode("n", "Function")
    node.error(ConnectionError(text))
    assert "s3cret" not in node.attributes["error"] and "s3cret" not in "".join(node.logs)
