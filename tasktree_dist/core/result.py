"""Status and Result: what every node returns."""

from __future__ import annotations

import enum
import reprlib
from typing import Any

from .display import display_string


class Status(enum.IntEnum):
    """A node's outcome: OK or FAIL."""

    OK = 0
    FAIL = 1

    def __str__(self) -> str:
        return "OK" if self is Status.OK else "FAIL"

    def invert(self) -> Status:
        return Status.FAIL if self is Status.OK else Status.OK


class Result:
    """A node's outcome: a status plus an optional payload.

    A tiny slotted class rather than a dataclass because one is made per node execution on the hot path.
    """

    __slots__ = ("status", "data")

    def __init__(self, status: Status, data: Any = None) -> None:
        self.status = status
        self.data = data

    @classmethod
    def OK(cls, data: Any = None) -> Result:  # noqa: N802 - spec name
        return cls(Status.OK, data)

    @classmethod
    def FAIL(cls, data: Any = None) -> Result:  # noqa: N802 - spec name
        return cls(Status.FAIL, data)

    def is_ok(self) -> bool:
        return self.status is Status.OK

    def is_fail(self) -> bool:
        return self.status is Status.FAIL

    def json(self) -> dict[str, Any]:
        return {"status": str(self.status), "data": None if self.data is None else display_string(self.data)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return self.status is other.status and self.data == other.data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{self.status}({reprlib.repr(self.data)})"
