"""Non-streaming chat completions sent with aiohttp and orjson, configured by the AsyncOpenAI client.

Why: `client.chat.completions.create()` costs about 2 ms of CPU per call (parameter transform, httpx request and
URL building, pydantic response models). With a hundred calls in flight that CPU, not the provider, limits a
batch. This module sends the same request on the loop's shared aiohttp session (llm_clients.get_llm_session)
and returns the parsed JSON as a plain dict, for a fraction of that.

openai-python still defines the call: base URL, headers (auth, organization/project, default_headers,
User-Agent...), default query, timeout and max_retries are read from the client; failures are raised as its
exception classes; retries follow its policy (statuses, x-should-retry, retry-after[-ms], exponential backoff
with jitter). Calls this transport cannot reproduce exactly go through `create()` instead (see `prepare`).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp
import openai
import orjson
from yarl import URL

from . import clients as llm_clients
from . import http1

#: create() arguments that are request options, not body fields.
_OPTIONS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})
#: Non-string keys are encoded as json.dumps does; dataclasses and datetimes are left to create() (TypeError).
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME

# openai-python's retry policy constants
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 120.0
_NON_FINITE = re.compile(r"[+-]?(inf|infinity|nan)", re.IGNORECASE)

_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


class MalformedResponseError(ValueError):
    """The provider answered a success status with a body that is not JSON."""


#: What a call raises when the provider, the network or the answer fails (the LLM node FAILs on them).
PROVIDER_ERRORS = (openai.OpenAIError, OSError, ValueError)


# --------------------------------------------------------------------------- retry policy (openai-python's)


def server_delay(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked to wait: retry-after-ms, else retry-after in seconds or as an HTTP date."""
    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value)
        except ValueError:
            continue
        if math.isfinite(delay):
            return delay / divisor
        # a literal inf/nan is no usable delay; a number too big for a float is too long to wait
        return None if _NON_FINITE.fullmatch(value.strip()) else MAX_RETRY_AFTER_S + 1
    return _http_date_delay(headers.get("retry-after"))


def _http_date_delay(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """Never when the server asks for more than two minutes; else x-should-retry decides; else 408, 409, 429, 5xx."""
    delay = server_delay(headers)
    if delay is not None and delay > MAX_RETRY_AFTER_S:
        return False
    verdict = headers.get("x-should-retry")
    if verdict in ("true", "false"):
        return verdict == "true"
    return status in (408, 409, 429) or status >= 500


def retry_delay(retries_taken: int, headers: Mapping[str, str] | None = None) -> float:
    """The server's delay when it gives one of up to two minutes; else 0.5 s doubling per retry up to 8 s, less up
    to 25 % jitter."""
    delay = server_delay(headers)
    if delay is not None and 0 < delay <= MAX_RETRY_AFTER_S:
        return delay
    backoff = min(INITIAL_RETRY_DELAY_S * 2.0 ** min(retries_taken, 1000), MAX_RETRY_DELAY_S)
    return backoff * (1 - 0.25 * random.random())


# --------------------------------------------------------------------------- what a client contributes


def _with_headers(headers: dict[str, str], extra: Mapping[str, Any]) -> dict[str, str]:
    """`headers` overridden by `extra`, names compared case-insensitively; an openai.Omit value removes one."""
    merged = dict(headers)
    for name, value in extra.items():
        for same in [key for key in merged if key.lower() == name.lower()]:
            del merged[same]
        if not isinstance(value, openai.Omit):
            merged[name] = str(value)
    return merged


def _timeouts(timeout: Any) -> tuple[aiohttp.ClientTimeout, dict[str, str]]:
    """openai's timeout (seconds, an httpx Timeout, or None for none) for aiohttp, and the read-timeout header."""
    if timeout is None or isinstance(timeout, int | float):
        connect = read = pool = timeout
    else:
        connect, read, pool = timeout.connect, timeout.read, timeout.pool
    header = {} if read is None else {"x-stainless-read-timeout": str(read)}
    return llm_clients.aiohttp_timeout(connect, read, pool), header


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """A client's chat-completions URL, headers, timeout and retries, worked out once per client."""

    path: str  # the URL without its query
    query: dict[str, Any]  # the client's default_query
    stringify: Any  # the client's query encoder (openai's Querystring.stringify)
    url: URL
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout
    max_retries: int

    def call(self, payload: bytes, request: Mapping[str, Any]) -> DirectCall:
        """The call for one request body, with the request's per-call options applied."""
        url, headers, timeout = self.url, self.headers, self.timeout
        if request.get("extra_query"):
            url = _url(self.path, self.stringify, {**self.query, **request["extra_query"]})
        if "timeout" in request and not isinstance(request["timeout"], openai.NotGiven):
            timeout, read_header = _timeouts(request["timeout"])
            headers = _with_headers(headers, read_header or {"x-stainless-read-timeout": openai.Omit()})
        if request.get("extra_headers"):
            headers = _with_headers(headers, request["extra_headers"])
        lean = http1.AVAILABLE and llm_clients.transport() == "direct"
        return DirectCall(url, payload, headers, timeout, self.max_retries, lean)


def _url(path: str, stringify: Any, query: dict[str, Any]) -> URL:
    encoded = stringify(query) if query else ""
    return URL(f"{path}?{encoded}" if encoded else path, encoded=True)


_endpoints: weakref.WeakKeyDictionary[openai.AsyncOpenAI, _Endpoint | None] = weakref.WeakKeyDictionary()


def _endpoint(client: openai.AsyncOpenAI) -> _Endpoint | None:
    try:
        return _endpoints[client]
    except KeyError:
        endpoint = _endpoints[client] = _build_endpoint(client)
        return endpoint


def _build_endpoint(client: openai.AsyncOpenAI) -> _Endpoint | None:
    """None when only openai-python can send for this client: an http_client the caller passed (proxies, mounts,
    event hooks), proxy variables, an auth other than a fixed key (a key callable, workload identity, a
    provider), or a base URL with a query."""
    auth = client.auth_headers
    if (
        not llm_clients.has_own_http_client(client)
        or llm_clients.proxies_from_env()
        or client.custom_auth is not None
        or getattr(client, "workload_identity", None) is not None
        or not auth
        or client.base_url.query
    ):
        return None
    timeout, read_header = _timeouts(client.timeout)
    headers = _with_headers(auth, client.default_headers)
    headers = _with_headers(headers, {"x-stainless-retry-count": "0", **read_header})
    path = f"{client.base_url}chat/completions"
    query = dict(client.default_query)
    stringify = client.qs.stringify
    return _Endpoint(path, query, stringify, _url(path, stringify, query), headers, timeout, client.max_retries)


# --------------------------------------------------------------------------- one call


def prepare(client: openai.AsyncOpenAI, request: Mapping[str, Any]) -> DirectCall | None:
    """The direct call for `client.chat.completions.create(**request)`, or None when create() must send it: the
    "openai" transport setting, a stream, a client this transport cannot reproduce, or a body orjson cannot encode
    plainly (create() then encodes it as it always did, or raises its own clear error)."""
    if not llm_clients.transport().startswith("direct") or request.get("stream"):
        return None
    endpoint = _endpoint(client)
    if endpoint is None:
        return None
    body = request if _OPTIONS.isdisjoint(request) else {k: v for k, v in request.items() if k not in _OPTIONS}
    if request.get("extra_body"):
        body = {**body, **request["extra_body"]}
    try:
        payload = orjson.dumps(body, option=_ORJSON_OPTIONS)
    except TypeError:
        return None
    return endpoint.call(payload, request)


@dataclass(slots=True)
class DirectCall:
    """One chat-completions POST, ready to send (with retries) on the running loop's session."""

    url: URL
    payload: bytes
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout
    max_retries: int
    #: Sent by the lean HTTP/1.1 client (http1) rather than an aiohttp session: TASKTREE_LLM_TRANSPORT=direct.
    lean: bool

    async def send(self) -> Any:
        """The parsed response body; openai's exceptions for failures, after max_retries retries."""
        session = llm_clients.get_llm_session()
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                status, headers, content = await self._post(session, attempt)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if last:
                    self._raise_transport_error(exc)
                delay = retry_delay(attempt)
            else:
                if status < 400:
                    return _json_body(status, content)
                if last or not should_retry(status, headers):
                    raise self._status_error(status, headers, content)
                delay = retry_delay(attempt, headers)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- flow control (llm/flow.py runs the retries of governed calls: each attempt waits for the fleet's limits)
    async def send_once(self, attempt: int = 0) -> Any:
        """One attempt, no retry: the parsed body, or openai's exception for the status or transport failure."""
        try:
            status, headers, content = await self._post(llm_clients.get_llm_session(), attempt)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._raise_transport_error(exc)
        if status < 400:
            return _json_body(status, content)
        raise self._status_error(status, headers, content)

    async def _post(self, session: aiohttp.ClientSession, attempt: int) -> tuple[int, Mapping[str, str], bytes]:
        headers = self.headers if not attempt else _with_headers(self.headers, {"x-stainless-retry-count": attempt})
        if self.lean:
            data = http1.request_bytes(self.url, headers, self.payload)
            return await http1.post(self.url, data, self.timeout, _ssl_context)
        async with session.post(self.url, data=self.payload, headers=headers, timeout=self.timeout) as response:
            return response.status, response.headers, await response.read()

    def _httpx_request(self) -> Any:
        return llm_clients._httpx_module().Request("POST", str(self.url))

    def _raise_transport_error(self, exc: BaseException) -> NoReturn:
        """APITimeoutError or APIConnectionError, caused by the httpx error openai-python would have seen."""
        httpx = llm_clients._httpx_module()
        cause = llm_clients.httpx_error(httpx, exc)
        cause.__cause__ = exc
        if isinstance(cause, httpx.TimeoutException):
            raise openai.APITimeoutError(request=self._httpx_request()) from cause
        raise openai.APIConnectionError(request=self._httpx_request()) from cause

    def _status_error(self, status: int, headers: Mapping[str, str], content: bytes) -> openai.APIStatusError:
        """The APIStatusError subclass for `status`, its message from the body's error.message as openai's."""
        response = llm_clients._httpx_module().Response(
            status, headers=list(headers.items()), content=content, request=self._httpx_request()
        )
        text = response.text.strip()
        try:
            body: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            body = text
        data = body.get("error", body) if isinstance(body, dict) else body
        message = data.get("message") if isinstance(data, dict) else None
        summary = f"Error code: {status}" + (f" - {message}" if isinstance(message, str) and message else "")
        fallback = openai.InternalServerError if status >= 500 else openai.APIStatusError
        return _STATUS_ERRORS.get(status, fallback)(summary, response=response, body=data)


def _ssl_context() -> Any:
    """TLS as openai-python's httpx sets it up (certifi), for the lean client's https connections."""
    return llm_clients._httpx_module().create_ssl_context()


def _json_body(status: int, content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise MalformedResponseError(f"the HTTP {status} response is not JSON ({exc}): {content[:200]!r}") from exc
