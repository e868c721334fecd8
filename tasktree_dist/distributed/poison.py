"""Refusing malformed ("poison") messages on tasktree queues before Celery's own code reads them.

Why: Celery 5.7's consumer trusts a task message's shape. Measured on a worker: a JSON body of `null`, a
number or an object, a short list, an empty body or a `timelimit` header like `"abc"` raises out of the
consumer (TypeError / ValueError) and the worker process exits; a missing `id` header raises KeyError, which
the Redis transport counts as a lost connection, so the consumer reconnects, the message comes back and the
worker loops, serving nothing. A string body or a non-object `embed` gets past the consumer and fails in the
pool thread before the task runs, so the message is never acknowledged (acks_late) and comes back after the
visibility timeout. Protocol-2 messages also name a task (Celery's built-in ones included) and, in `embed`,
callbacks Celery would build and send: content would decide what runs.

How: `GuardedConsumer` (Celery's `worker_consumer` setting) wraps the handler Celery builds for task messages
(`Consumer.create_task_handler`). `problem()` checks each message first, cheaply and without importing or
building anything it names: a registered task name (not one of Celery's built-ins), a string id, the types of
the protocol-2 headers the worker reads, JSON content, and a `[args, kwargs, embed]` body with no chained work
whose arguments fit the task's signature. A message with a problem is refused: logged once (task, id, queue,
reason), acknowledged so it is never redelivered, and Celery's `task_rejected` signal sent. Whatever Celery's
handler still raises for a message is refused the same way instead of stopping the consumer; only real
connection errors propagate (Celery reconnects). Celery's own refusal paths (decode errors, unknown messages
and tasks, invalid tasks) refuse the same way: they would otherwise reject, log a body dump, or, for an unknown
task without an id, raise. Inside `tasktree.execute`, `split_units` keeps what is not a unit object away from
the runtime.

One poison gets no further than kombu's Redis transport: the message envelope is JSON read with kombu's object
hook, so a header holding `{"__type__": "datetime", "__value__": "bad"}` (or "uuid", "decimal"... with a bad
value) raises while the message is read off the list, before any Celery hook, and the worker exits.
`RedisTransport` (Celery's `broker_transport` for redis:// brokers) logs and skips such an envelope instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celery import signals
from celery.utils.saferepr import saferepr
from celery.worker.consumer import Consumer
from kombu.exceptions import OperationalError
from kombu.serialization import prepare_accept_content
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from vine import promise

from ..core.log import logger

#: Celery registers its built-in tasks (`celery.accumulate`, `celery.chord_unlock`...) on every app: a message must
#: not choose them. The tasks a worker runs are tasktree's and those its imports register (benchmarks' baselines).
BUILTIN_PREFIX = "celery."
#: Longest `argsrepr` / `kwargsrepr` kept (Celery logs and sends them with each message; it writes <= 1 KiB).
REPR_MAX = 64 * 1024
#: Longest time limit accepted, in seconds: keeps timer arithmetic finite (JSON can carry 10**400).
TIME_LIMIT_MAX = 1e9
#: Protocol-2 `embed` keys (celery.app.amqp.as_task_v2); any value in them would make Celery build signatures.
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
#: Encodings kombu writes JSON in.
JSON_ENCODINGS = frozenset({"utf-8", "utf8"})


def _optional(kind: type | tuple[type, ...]) -> Callable[[Any], bool]:
    return lambda value: value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _limit(value: Any) -> bool:
    # the range check also refuses NaN and infinities, and compares huge integers without overflowing
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return value is None or (number and 0 <= value <= TIME_LIMIT_MAX)


def _time_limits(value: Any) -> bool:
    """Celery unpacks a truthy `timelimit` into (hard, soft) before running the task."""
    return value is None or (isinstance(value, list | tuple) and len(value) == 2 and all(map(_limit, value)))


def _repr(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= REPR_MAX)


def _strings(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value))


#: The protocol-2 headers a worker reads, and what each may hold. Other headers pass (extensions, stamps).
HEADER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "shadow": (_optional(str), "a string or null"),
    "root_id": (_optional(str), "a string or null"),
    "parent_id": (_optional(str), "a string or null"),
    "group": (_optional(str), "a string or null"),
    "group_index": (lambda v: v is None or _count(v), "a non-negative integer or null"),
    "origin": (_optional(str), "a string or null"),
    "lang": (_optional(str), "a string or null"),
    "argsrepr": (_repr, f"a string of at most {REPR_MAX} characters or null"),
    "kwargsrepr": (_repr, f"a string of at most {REPR_MAX} characters or null"),
    "retries": (_count, "a non-negative integer"),
    "replaced_task_nesting": (_count, "a non-negative integer"),
    "ignore_result": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "timelimit": (_time_limits, f"[hard, soft], each null or 0..{TIME_LIMIT_MAX:.0e} seconds"),
    "stamped_headers": (_strings, "a list of strings or null"),
    "stamps": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    # a unit runs now or never: one held for an ETA would sit unacknowledged in a worker's memory
    "eta": (lambda v: v is None, "null (tasktree messages never carry an ETA)"),
    "expires": (lambda v: v is None, "null (tasktree messages never expire)"),
}


def shown(value: Any, limit: int = 80) -> str:
    """A short, safe repr for the log (ids and names come from the message: any size, any depth)."""
    return saferepr(value, maxlen=limit, maxlevels=2)


def brief(exc: BaseException) -> str:
    """An exception on one short line (its text can quote message content)."""
    return f"{type(exc).__name__}: {' '.join(str(exc)[:400].split())[:200]}"


def problem(message: Any, tasks: Mapping[str, Any], accept: set[str]) -> str | None:
    """What is wrong with a task message, or None when it is a well-formed tasktree message.

    Decodes the body with kombu (the result is cached on the message, so Celery does not decode it again).
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return "headers are not an object"
    name = headers.get("task")
    if not isinstance(name, str):
        return "no task name in the headers (not a protocol-2 Celery task message)"
    if name not in tasks or name.startswith(BUILTIN_PREFIX):
        return f"task {shown(name)} is not a task this worker runs"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "no message id (the `id` header must be a non-empty string)"
    for header, (valid, expected) in HEADER_RULES.items():
        if header in headers and not valid(headers[header]):
            return f"header {header!r} is {shown(headers[header], 60)}, expected {expected}"
    # kombu trusts application/data and application/text whatever `accept` says: check the type here
    if message.content_type not in accept:
        return f"content type {shown(message.content_type)} is not accepted (JSON only)"
    if (message.content_encoding or "").lower() not in JSON_ENCODINGS:
        return f"content encoding {shown(message.content_encoding)} is not UTF-8"
    try:
        body = message.decode()
    except Exception as exc:  # noqa: BLE001 - whatever kombu raises for these bytes, the message is refused
        return f"body cannot be decoded: {brief(exc)}"
    if not (isinstance(body, list) and len(body) == 3):
        return f"body is {shown(body, 60)}, expected [args, kwargs, embed] (Celery task protocol 2)"
    args, kwargs, embed = body
    if not isinstance(args, list):
        return f"args are {type(args).__name__}, expected a list"
    if not isinstance(kwargs, dict):
        return f"kwargs are {type(kwargs).__name__}, expected an object"
    if not isinstance(embed, dict):
        return f"embed is {type(embed).__name__}, expected an object"
    if not embed.keys() <= EMBED_KEYS or any(embed.values()):
        return f"embed {shown(embed, 100)} chains work (callbacks, errbacks, chain, chord must be empty)"
    check = getattr(tasks[name], "__header__", None)  # Celery's own check of arguments against the signature
    try:
        if check is not None:
            check(*args, **kwargs)
    except TypeError as exc:
        return f"arguments do not fit {name}: {exc}"
    return None


def refuse(consumer: Consumer, message: Any, reason: str) -> None:
    """Log the message once with what was wrong, acknowledge it (never redelivered), signal `task_rejected`."""
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    delivery = getattr(message, "delivery_info", None) or {}
    task, task_id = headers.get("task"), headers.get("id")
    logger.error(
        "refused a message on queue %s (%s, %s): %s; acknowledged, not redelivered",
        shown(delivery.get("routing_key")),
        f"task {shown(task)}" if task is not None else "no task name",
        f"id {shown(task_id)}" if task_id is not None else "no id",
        reason[:500],
    )
    if hasattr(message, "ack_log_error") and not message.acknowledged:
        message.ack_log_error(logger, consumer.connection_errors)
    signals.task_rejected.send(sender=consumer, message=message, exc=None)


class GuardedConsumer(Consumer):
    """Celery's consumer with every task message checked first (see the module docstring)."""

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], Any]:
        handle = super().create_task_handler(promise)
        tasks = self.app.tasks
        accept = prepare_accept_content(self.app.conf.accept_content)
        recoverable = tuple(self.connection_errors) + tuple(self.channel_errors)

        def on_task_received(message: Any) -> Any:
            reason = problem(message, tasks, accept)
            if reason is not None:
                return refuse(self, message, reason)
            try:
                return handle(message)
            except KeyError as exc:  # the Redis transport counts KeyError as a lost connection: a reconnect loop
                refuse(self, message, f"Celery could not read it: {brief(exc)}")
            except recoverable:
                raise  # the broker connection is gone: Celery reconnects (and the broker redelivers)
            except Exception as exc:  # noqa: BLE001 - nothing in a message may stop the consumer
                refuse(self, message, f"Celery could not read it: {brief(exc)}")
            return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        refuse(self, message, f"body cannot be decoded: {brief(exc)}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        refuse(self, message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        refuse(self, message, "unknown task")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        refuse(self, message, f"invalid task message: {brief(exc)}")


def split_units(units: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The unit objects of a message's `units` argument, and what was wrong with the rest (None: nothing).

    The runtime validates each object (and FAILs one it cannot read if it names a reply list); anything that is
    not an object has no reply list to answer on, so it is dropped here, logged by the caller.
    """
    if not isinstance(units, list):
        return [], f"units are {type(units).__name__}, expected a list of unit objects"
    objects = [unit for unit in units if isinstance(unit, dict)]
    if len(objects) == len(units):
        return objects, None
    kinds = sorted({type(unit).__name__ for unit in units if not isinstance(unit, dict)})
    return objects, f"{len(units) - len(objects)} of {len(units)} units are not objects ({', '.join(kinds)})"


class _Guarded:
    """What RedisChannel and SentinelChannel add to kombu's channels (see the module docstring)."""

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except (Empty, OSError, RedisError, OperationalError):
            raise  # nothing to read, or the connection failed: kombu and Celery handle these
        except Exception as exc:  # noqa: BLE001 - the envelope's content (JSON object hook, UTF-8, base64...)
            # BRPOP already took it off the list and it never reached the unacknowledged set: it is gone
            logger.error(
                "refused a message on queue %s (envelope unreadable): %s; dropped, not redelivered",
                " or ".join(map(shown, sorted(self.active_queues))) or "?", brief(exc),
            )
            return True

    def _connparams(self, asynchronous: bool = False) -> Any:
        # Celery 5.7, on a lost connection, closes it after collect() released its client; restoring unacknowledged
        # messages then reads the missing connection info, raises AttributeError and stops the worker (seen on a
        # Redis restart). A connection error is what that close path ignores: the messages come back by the
        # visibility timeout, and tasktree re-sends its own units long before.
        if getattr(self.connection, "client", None) is None:
            raise RedisConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous)


class RedisChannel(_Guarded, kombu_redis.Channel):
    """kombu's Redis channel, skipping a message whose envelope cannot be read (see the module docstring)."""


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with `RedisChannel`."""

    Channel = RedisChannel


class SentinelChannel(_Guarded, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (a Redis broker found through its sentinels), guarded the same way."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with `SentinelChannel`."""

    Channel = SentinelChannel
