"""encode_value's fast path (no item paths) gives exactly the named walk's output, and errors still say where."""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest

from tasktree_dist.core.result import Result, Status
from tasktree_dist.core.serde import EncodingError, _encode_named, decode_value, encode_value, register_type


@register_type
@dataclass
class _Doc:
    title: str = ""
    tags: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)


class _Colour(enum.StrEnum):
    RED = "red"


class _Items(list):  # type: ignore[type-arg]
    pass


VALUES = [
    1, 2.5, "x", True, None, _Colour.RED, _Items([1, 2]),
    [1, (2, 3), {"a": [None, True]}],
    {"__tt__": 1, "nested": OrderedDict(c=1)},
    Result(Status.OK, [1, {"k": (1, 2)}]),
    _Doc("t", ["a", "b"], {"n": [_Doc("inner")], "t": (1,)}),
    [_Doc(str(i), meta={"i": i}) for i in range(3)],
]


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ for v in VALUES])
def test_fast_path_encodes_as_the_named_walk(value: object) -> None:
    assert encode_value(value) == _encode_named(value, "value")


def test_round_trip_keeps_types() -> None:
    doc = _Doc("t", ["a"], {"pair": (1, 2)})
    assert decode_value(encode_value(doc)) == doc


@pytest.mark.parametrize(("value", "message"), [
    ({1: 2}, "blackboard: dict key 1 of type int is not a string"),
    ([1, object()], "blackboard[1]: cannot encode builtins.object"),
    ({"a": {"b": [1, {2: 3}]}}, "blackboard.a.b[1]: dict key 2 of type int"),
    (_Doc(meta={"s": {1}}), "blackboard.meta.s: cannot encode builtins.set"),
])
def test_errors_still_name_where(value: object, message: str) -> None:
    with pytest.raises(EncodingError) as caught:
        encode_value(value, "blackboard")
    assert message in str(caught.value)
