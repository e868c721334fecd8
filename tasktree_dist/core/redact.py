"""Secrets out of what people see: the password of a URL (`scheme://user:password@host`) and query arguments named
like secrets become `***`. Applied where the library prints or stores URLs and exception text (logs, traces,
run errors, flow-control scope names, the CLI's messages), so a `rediss://` password or an LLM proxy's credentials
never reach a log, a trace, a record or a metrics label."""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
#: Query arguments whose values are secrets.
SECRET_ARGUMENTS = re.compile(r"pass|secret|token|key|auth|sig", re.I)
#: `scheme://user:password@` inside any text (a URL in an exception message, a log line).
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)(?P<password>[^\s@/]+)(?P<at>@)")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&][^=&\s]*(?:pass|secret|token|key|auth|sig)[^=&\s]*=)(?P<value>[^&\s#)\]'\"]+)", re.I
)


def redact_url(url: str) -> str:
    """`url` with its password and secret-named query arguments masked (unchanged when it has neither)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    if query and SECRET_ARGUMENTS.search(query):
        query = urlencode([(k, MASK if SECRET_ARGUMENTS.search(k) and not k.startswith("ssl_") else v)
                           for k, v in parse_qsl(query, keep_blank_values=True)], safe="*/")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """Every URL password and secret-named query argument inside free text masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('head')}{MASK}{m.group('at')}", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('head')}{MASK}", text)


class RedactingFilter(logging.Filter):
    """A logging filter masking URL passwords in a record's message (installed on the library's logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's business, not ours
            return True
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
