"""JSON encoding of values that cross a boundary (a cache entry, a process, a Redis key) with types kept.

Plain JSON values pass as they are. Tuples, Results and instances of *registered* types (dataclasses,
pydantic models) are tagged with a registered name; decoding looks that name up in the allowlist built by
`register_type`, so content never names an arbitrary class to import.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Iterator
from typing import Any

import orjson

from .errors import TasktreeError
from .result import Result, Status

TAG = "__tt__"

_by_name: dict[str, type] = {}
_by_type: dict[type, str] = {}


class EncodingError(TasktreeError, TypeError):
    """A value cannot cross a process boundary; the message names where it sits and its type."""


def type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class UnregisteredTypeWarning(UserWarning):
    """A value was read as plain JSON dicts because its type is not registered in this process."""


def register_type(cls: type, name: str | None = None) -> type:
    """Allow instances of `cls` (a dataclass or pydantic model) to be encoded and decoded with their type.

    Usable as a class decorator. Blackboard types of built trees are registered automatically.
    """
    if not (dataclasses.is_dataclass(cls) or hasattr(cls, "model_validate")):
        raise TasktreeError(f"register_type: {cls!r} is neither a dataclass nor a pydantic model")
    name = name or type_name(cls)
    existing = _by_name.get(name)
    if existing is not None and existing is not cls:
        # Re-running a module (tests, notebooks) re-creates the class: the newest definition wins.
        _by_type.pop(existing, None)
    _by_name[name] = cls
    _by_type[cls] = name
    return cls


def registered_type(name: str) -> type:
    try:
        return _by_name[name]
    except KeyError:
        raise EncodingError(f"type {name!r} is not registered (register_type) and will not be decoded") from None


def registered_types() -> dict[str, type]:
    """Every registered type by its registered name (what specs and the fleet's palette may name)."""
    return dict(_by_name)


def registered_name(cls: type) -> str | None:
    return _by_type.get(cls)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """A registered type's field names (dataclasses.fields() is slow enough to show in per-unit profiles)."""
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return tuple(cls.model_fields)  # type: ignore[attr-defined]


@functools.cache
def _init_field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if f.init)


def _fields_of(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in _field_names(type(value))}


#: JSON scalars: encoded and decoded as themselves (checked by exact type, the hot path of big payloads).
_SCALARS = frozenset({str, int, float, bool, type(None)})


def encode_value(value: Any, where: str = "value") -> Any:
    """Encode to JSON-compatible data; raises EncodingError naming `where` (e.g. `blackboard.items[3]`)."""
    try:
        return _encode(value)
    except _Unencodable:
        return _encode_named(value, where)  # the same walk again, naming where the culprit sits: it raises


class _Unencodable(Exception):
    """Raised by the fast path; encode_value then walks the value again to name where the culprit sits."""


def _encode(value: Any) -> Any:
    """encode_value without tracking where each item sits (building those path texts was a third of an LLM
    result's encoding time); the same output. Exact types first: the common case of big payloads."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        out = {key if type(key) is str else _str_key(key): item if type(item) in _SCALARS else _encode(item)
               for key, item in value.items()}
        return {TAG: "dict", "items": out} if TAG in out else out
    if kind is list:
        return [item if type(item) in _SCALARS else _encode(item) for item in value]
    # then _encode_named's order (a subclass of int, list, dict... is encoded as its base)
    if isinstance(value, int | float | str):
        return value
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        out = {_str_key(key): _encode(item) for key, item in value.items()}
        return {TAG: "dict", "items": out} if TAG in out else out
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [_encode(item) for item in value]}
    if isinstance(value, Result):
        return {TAG: "Result", "status": value.status.value, "data": _encode(value.data)}
    name = _by_type.get(kind)
    if name is not None:
        return {TAG: "obj", "type": name, "fields": {key: item if type(item) in _SCALARS else _encode(item)
                                                     for key, item in _fields_of(value).items()}}
    raise _Unencodable


def _str_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    raise _Unencodable


def _encode_named(value: Any, where: str) -> Any:
    """encode_value tracking where each item sits: the slow path, taken once a value turned out unencodable."""
    if type(value) in _SCALARS or isinstance(value, int | float | str):
        return value
    if isinstance(value, list):
        return [v if type(v) in _SCALARS else _encode_named(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"{where}: dict key {key!r} of type {type(key).__name__} is not a string")
            out[key] = item if type(item) in _SCALARS else _encode_named(item, f"{where}.{key}")
        if TAG in out:
            return {TAG: "dict", "items": out}
        return out
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [_encode_named(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, Result):
        return {TAG: "Result", "status": value.status.value, "data": _encode_named(value.data, f"{where}.data")}
    name = _by_type.get(type(value))
    if name is not None:
        fields = {k: _encode_named(v, f"{where}.{k}") for k, v in _fields_of(value).items()}
        return {TAG: "obj", "type": name, "fields": fields}
    raise EncodingError(
        f"{where}: cannot encode {type(value).__module__}.{type(value).__qualname__} as JSON "
        "(use JSON values, or register the dataclass/pydantic type with tasktree_dist.register_type)"
    )


#: Lists longer than this are encoded a slice at a time by dump_chunks (a large result never exists twice encoded).
_STREAM_MIN = 64


def dump_chunks(value: Any, where: str = "value", size: int = 1 << 20) -> Iterator[bytes]:
    """orjson.dumps(encode_value(value)) as chunks of about `size` bytes, produced as they are encoded: a
    100,000-item result goes to Redis a megabyte at a time, and neither its intermediate form nor its JSON exists
    whole in memory (nor do 100,000 small outputs: orjson's come with kilobytes of spare capacity each)."""
    out = bytearray()
    for _ in _dump(out, value, where, size):
        yield bytes(out)
        out.clear()
    if out:
        yield bytes(out)


def _dump(out: bytearray, value: Any, where: str, size: int) -> Iterator[None]:
    """Appends value's encoding to `out`, yielding whenever `out` holds `size` bytes or more."""
    if isinstance(value, list) and len(value) >= _STREAM_MIN:
        out += b"["
        for start in range(0, len(value), _STREAM_MIN):
            if start:
                out += b","
            part = value[start:start + _STREAM_MIN]
            try:
                out += orjson.dumps(encode_value(part, where))[1:-1]  # a slice at a time: few calls, small peaks
            except EncodingError:
                for i, item in enumerate(part, start):  # the error again, with the item's own index
                    encode_value(item, f"{where}[{i}]")
                raise
            if len(out) >= size:
                yield
        out += b"]"
        return
    if isinstance(value, Result) and isinstance(value.data, list) and len(value.data) >= _STREAM_MIN:
        out += orjson.dumps({TAG: "Result", "status": value.status.value})[:-1]
        out += b',"data":'
        yield from _dump(out, value.data, f"{where}.data", size)
        out += b"}"
        return
    name = _by_type.get(type(value))
    if name is not None and dataclasses.is_dataclass(value):
        fields = _fields_of(value)
        if any(isinstance(v, list) and len(v) >= _STREAM_MIN for v in fields.values()):
            out += orjson.dumps({TAG: "obj", "type": name})[:-1]
            out += b',"fields":{'
            for i, (key, item) in enumerate(fields.items()):
                out += b',"' if i else b'"'
                out += orjson.dumps(key)[1:]
                out += b":"
                yield from _dump(out, item, f"{where}.{key}", size)
            out += b"}}"
            return
    out += orjson.dumps(encode_value(value, where))
    if len(out) >= size:
        yield


#: Decoded dict keys and texts up to this length are interned (one object however many results repeat them).
_INTERN_MAX = 16
_intern = sys.intern


def decode_value(data: Any) -> Any:
    if type(data) in _SCALARS:
        return data
    if isinstance(data, list):
        return [v if type(v) in _SCALARS else decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(TAG)
    if tag is None:
        # keys and short texts ("role": "user") repeat across a batch's results: shared, not held once per item
        return {_intern(k): (_intern(v) if len(v) <= _INTERN_MAX else v) if type(v) is str else
                v if type(v) in _SCALARS else decode_value(v) for k, v in data.items()}
    if tag == "obj":
        cls = registered_type(data["type"])
        fields = {k: (_intern(v) if len(v) <= _INTERN_MAX else v) if type(v) is str else decode_value(v)
                  for k, v in data["fields"].items()}
        return build_instance(cls, fields)
    if tag == "tuple":
        return tuple(decode_value(v) for v in data["items"])
    if tag == "Result":
        return Result(Status(data["status"]), decode_value(data["data"]))
    if tag == "dict":
        return {k: decode_value(v) for k, v in data["items"].items()}
    raise EncodingError(f"unknown encoded tag {tag!r}")


def strip_unregistered(data: Any, missing: set[str]) -> Any:
    """The encoded `data` with every object of a type not registered here replaced by the plain dict of its fields
    (the type's name added to `missing`): what a process that does not import a tree's module can still read."""
    if isinstance(data, list):
        return [strip_unregistered(v, missing) for v in data]
    if not isinstance(data, dict):
        return data
    if data.get(TAG) == "obj" and data.get("type") not in _by_name:
        missing.add(str(data.get("type")))
        fields = data.get("fields") if isinstance(data.get("fields"), dict) else {}
        return {TAG: "dict", "items": {k: strip_unregistered(v, missing) for k, v in fields.items()}}
    return {k: strip_unregistered(v, missing) for k, v in data.items()}


def build_instance(cls: type, fields: dict[str, Any]) -> Any:
    """Rebuild a registered type from decoded fields without re-running validation side effects."""
    if hasattr(cls, "model_construct"):
        return cls.model_construct(**fields)
    init_fields = _init_field_names(cls)
    instance = cls(**{k: v for k, v in fields.items() if k in init_fields})
    for key, value in fields.items():
        if key not in init_fields:
            object.__setattr__(instance, key, value)
    return instance
