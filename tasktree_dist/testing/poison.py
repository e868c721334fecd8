"""Malformed ("poison") messages for a tasktree queue, published raw through kombu.

Tests, benchmarks and demos put these on a worker's queue to show that each one is refused (logged once,
acknowledged, never redelivered) and that the worker keeps serving well-formed messages. Every message is data
only: the pickle and YAML bodies encode plain lists, never an object to construct.
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

TASK = "tasktree.execute"
JSON = "application/json"
#: The protocol-2 embed part of a Celery message (what `send_task` puts there when nothing is chained).
EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: A well-formed body: no units. Header poisons use it, so the header is the only thing wrong.
NO_UNITS: list[Any] = [[[]], {}, EMBED]
_MISSING = object()


@dataclass(frozen=True)
class Poison:
    """One raw message. `marker` is its `id` header when that is a usable id (the refusal log names it)."""

    kind: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = JSON
    content_encoding: str = "utf-8"
    #: "worker": the worker refuses the message itself; "task": Celery runs it and the task refuses the units;
    #: "runtime": the units are objects, the worker runtime finds them unreadable (a FAIL if they name a reply list);
    #: "transport": the broker transport cannot read the envelope (Redis: kombu's JSON object hook in a header).
    refused_by: str = "worker"

    @property
    def marker(self) -> str | None:
        value = self.headers.get("id")
        return value if isinstance(value, str) and value.startswith("poison-") else None


def celery_headers(task_id: str, task: str = TASK, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The protocol-2 headers `send_task` writes, with `changes` applied (`_MISSING` drops a header)."""
    headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None, "group": None,
        "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "[poison]", "kwargsrepr": "{}", "origin": "poison@test", "ignore_result": False,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    headers.update(changes or {})
    return {name: value for name, value in headers.items() if value is not _MISSING}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int, leaf: Any = 0) -> Any:
    """A list nested `depth` deep (built iteratively: it is deeper than a recursive builder may go)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


#: Values of the wrong type (or out of range) for each protocol-2 header a worker reads.
BAD_HEADERS: dict[str, list[Any]] = {
    "id": [_MISSING, None, 5, 1.5, True, [], ["x"], {}, {"a": 1}, ""],
    "task": [_MISSING, None, 5, True, [], ["tasktree.execute"], {}, "", "no.such.task", "celery.accumulate",
             "celery.chord_unlock", "tasktree.other"],
    "timelimit": ["abc", [1], [1, 2, 3], ["a", "b"], {"a": 1}, 5, [-1, None], [None, -5], [True, None],
                  ["1", "2"], [[1], None], [{}, {}], "", []],
    "shadow": [5, [], {}, True],
    "eta": ["not a date", 5, [], {}, "9999-12-31T23:59:59", "2001-01-01T00:00:00"],
    "expires": ["never", 5.5, [], {}, "2001-01-01T00:00:00"],
    "group": [5, [], {}],
    "group_index": ["0", -1, 1.5, [], True],
    "retries": ["x", -1, 1.5, True, [], {}, None],
    "root_id": [5, [], {}],
    "parent_id": [5, [], {}],
    "argsrepr": [5, [], {"a": 1}, "x" * 200_000],
    "kwargsrepr": [5, [], {"a": 1}],
    "origin": [5, [], {}],
    "lang": [5, [], {}],
    "ignore_result": ["yes", 1, [], {}],
    "replaced_task_nesting": ["0", -1, 1.5, None, []],
    "stamped_headers": ["x", 5, [1], {}, [[]]],
    "stamps": ["x", 5, [], [1]],
}

#: Header values kombu's JSON object hook cannot decode: the Redis transport fails to read the envelope itself.
BAD_ENVELOPES: dict[str, Any] = {
    "stamps": {"__type__": "datetime", "__value__": "not a date"},
    "id": {"__type__": "uuid", "__value__": 5},
    "argsrepr": {"__type__": "decimal", "__value__": "x"},
    "retries": {"__type__": "no such type", "__value__": 1},
    "origin": {"__type__": "bytes", "__value__": 5},
    "root_id": {"__type__": "base64", "__value__": "a"},
}

#: Bodies of the wrong shape for protocol 2 (`[args, kwargs, embed]`, JSON).
BAD_BODIES: dict[str, bytes] = {
    "null": b"null",
    "number": b"42",
    "negative float": b"-1.5",
    "true": b"true",
    "string": b'"abc"',
    "object": b'{"a": 1}',
    "hybrid object": dumps({"args": [[]], "kwargs": {}}),
    "protocol 1 object": dumps({"task": TASK, "id": "p1", "args": [[]], "kwargs": {}}),
    "empty list": b"[]",
    "one-element list": b"[[]]",
    "two-element list": b"[[], {}]",
    "four-element list": dumps([[[]], {}, EMBED, 1]),
    "empty body": b"",
    "whitespace body": b"   ",
    "args object": dumps([{}, {}, EMBED]),
    "args string": dumps(["x", {}, EMBED]),
    "args null": dumps([None, {}, EMBED]),
    "kwargs list": dumps([[[]], [], EMBED]),
    "kwargs string": dumps([[[]], "k", EMBED]),
    "kwargs null": dumps([[[]], None, EMBED]),
    "embed list": dumps([[[]], {}, []]),
    "embed null": dumps([[[]], {}, None]),
    "embed string": dumps([[[]], {}, "e"]),
    "embed callback": dumps([[[]], {}, dict(EMBED, callbacks=[{"task": "celery.accumulate", "args": []}])]),
    "embed chain": dumps([[[]], {}, dict(EMBED, chain=[{"task": "celery.accumulate"}])]),
    "embed errback": dumps([[[]], {}, dict(EMBED, errbacks=[{"task": "celery.accumulate"}])]),
    "embed chord": dumps([[[]], {}, dict(EMBED, chord={"task": "celery.accumulate"})]),
    "embed overrides args": dumps([[[]], {}, dict(EMBED, args=[1, 2])]),
    "no arguments": dumps([[], {}, EMBED]),
    "too many arguments": dumps([[[], "t", [], "r", "extra"], {}, EMBED]),
    "units twice": dumps([[[]], {"units": []}, EMBED]),
    "truncated JSON": dumps(NO_UNITS)[:-3],
    "invalid UTF-8": b'[["\xff\xfe"], {}, {}]',
    "too deep to decode": b"[" * 100_000 + b"]" * 100_000,
    "kombu type marker": b'[[], {}, {"__type__": "datetime", "__value__": "not a date"}]',
    "huge string": b'"' + b"a" * 4_000_000 + b'"',
}

#: A unit object the runtime cannot read that names a reply list: the worker answers it with a FAIL completion.
FAILED_UNIT: dict[str, Any] = {
    "run_id": "poison-run", "execution_id": "poison-unit", "reply_to": "tasktree:reply:poison", "tree": 5,
}

#: Well-formed messages whose `units` argument is garbage: Celery runs them, the task refuses the units.
BAD_UNITS: dict[str, Any] = {
    "units string": "abc",
    "units number": 7,
    "units null": None,
    "units NaN": float("nan"),
    "units object": {"execution_id": "x"},
    "units of garbage": [1, "x", None, [], True, 2.5],
    "units failing validation": [{}, {"execution_id": 3}, {"reply_to": 5}, {"tree": []}, FAILED_UNIT],
    "units deeply nested": [nested(500)],
    "unit field deeply nested": [{"execution_id": nested(400), "reply_to": nested(400)}],
    "huge units": ["x" * 100] * 40_000,
}

#: Content types a JSON-only worker must refuse: data only (the pickle and YAML bodies hold plain lists).
FOREIGN: dict[str, tuple[str, str, bytes]] = {
    "pickle": ("application/x-python-serialize", "binary", pickle.dumps(NO_UNITS, protocol=4)),
    "yaml": ("application/x-yaml", "utf-8", b"- - []\n- {}\n- {}\n"),
    "msgpack": ("application/x-msgpack", "binary", b"\x93\x91\x90\x80\x80"),
    "octet-stream": ("application/octet-stream", "binary", dumps(NO_UNITS)),
    "text/plain": ("text/plain", "utf-8", dumps(NO_UNITS)),
    "application/data (kombu trusts it)": ("application/data", "binary", dumps(NO_UNITS)),
    "application/text (kombu trusts it)": ("application/text", "utf-8", dumps(NO_UNITS)),
    "xml": ("application/xml", "utf-8", b"<units/>"),
    "JSON in UTF-16": (JSON, "utf-16", json.dumps(NO_UNITS).encode("utf-16")),
    "JSON with an unknown encoding": (JSON, "no-such-codec", dumps(NO_UNITS)),
}


def poison_messages(count: int = 200, seed: int = 0, task: str = TASK) -> list[Poison]:
    """At least `count` malformed messages: every kind above, then random junk (reproducible from `seed`)."""
    rng = random.Random(seed)
    messages: list[Poison] = []

    def marker() -> str:
        return f"poison-{seed}-{len(messages)}"

    def add(kind: str, body: bytes, headers: dict[str, Any] | None = None, **options: Any) -> None:
        messages.append(Poison(kind, body, celery_headers(marker(), task) if headers is None else headers, **options))

    for name, values in BAD_HEADERS.items():
        for value in values:
            shown = "missing" if value is _MISSING else repr(value)[:40]
            add(f"header {name}={shown}", dumps(NO_UNITS), celery_headers(marker(), task, {name: value}))
    for name, value in BAD_ENVELOPES.items():
        add(f"envelope: header {name}={value!r}", dumps(NO_UNITS), celery_headers(marker(), task, {name: value}),
            refused_by="transport")
    add("no headers at all", dumps(NO_UNITS), {})
    add("unknown compression", dumps(NO_UNITS), dict(celery_headers(marker(), task), compression="x-none"))
    add("bad gzip", dumps(NO_UNITS), dict(celery_headers(marker(), task), compression="application/x-gzip"))
    for kind, body in BAD_BODIES.items():
        add(f"body: {kind}", body)
    for kind, units in BAD_UNITS.items():
        objects = isinstance(units, list) and all(isinstance(unit, dict) for unit in units)
        add(kind, dumps([[units], {}, EMBED]), refused_by="runtime" if objects else "task")
    for kind, (content_type, encoding, body) in FOREIGN.items():
        add(f"content: {kind}", body, content_type=content_type, content_encoding=encoding)
    valid = dumps(NO_UNITS)
    while len(messages) < count:
        roll = rng.random()
        if roll < 0.4:
            add("random bytes", rng.randbytes(rng.randint(1, 2000)),
                content_type=rng.choice([JSON, "application/octet-stream", "text/plain", "application/data"]))
        elif roll < 0.7:
            add("truncated body", valid[: rng.randint(0, len(valid) - 1)])
        else:
            name = rng.choice(sorted(BAD_HEADERS))
            value = rng.choice(BAD_HEADERS[name])
            add(f"random header {name}", valid, celery_headers(marker(), task, {name: value}))
    return messages


def publish(broker_url: str, queue: str, messages: Iterable[Poison]) -> int:
    """Put `messages` on `queue` as they are (raw bodies, no serializer), through the default exchange."""
    import kombu

    sent = 0
    with kombu.Connection(broker_url) as connection:
        producer = connection.Producer()
        for message in messages:
            producer.publish(
                message.body, routing_key=queue, headers=message.headers, content_type=message.content_type,
                content_encoding=message.content_encoding, serializer=None, retry=True,
            )
            sent += 1
    return sent
