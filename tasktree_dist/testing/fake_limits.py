"""Rate limits of the fake LLM server: requests and tokens per fixed window, per model, answered with 429.

Why: flow-control tests and benchmarks need a provider that really limits, and whose own counters say whether a
client ever pushed it over. Windows are fixed and aligned to the server clock (window k is
[k * window_s, (k + 1) * window_s) of time.time()), the way many providers reset per-minute quotas; window_s is
configurable so tests can use 2 s windows instead of 60 s.

A request is admitted when its window still has room for one more request and for its tokens (prompt + the
completion the server is about to produce); otherwise it is refused with 429 and Retry-After up to the window's
end, and not counted as admitted. So the admitted counters never exceed the limits; "windows over limit" counts
the windows in which a client asked for more than the limit (at least one request was refused), which a client
that limits itself correctly never causes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

#: Windows kept per server (oldest dropped first): enough for a benchmark of hours with 10 s windows.
MAX_WINDOWS_KEPT = 5000


@dataclass
class Window:
    """What one model was asked and admitted during one fixed window."""

    model: str
    index: int
    start: float
    requests: int = 0
    tokens: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused and how long until its window ends."""

    reason: str  # "requests" or "tokens"
    limit: int
    retry_after_s: float


class WindowLimits:
    """Per-model fixed-window counters and the admission rule. Thread-safe (the server's loop writes, tests read)."""

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        window_s: float = 60.0,
        models: set[str] | None = None,
        lock: threading.Condition | threading.Lock | None = None,
    ) -> None:
        self._lock = lock if lock is not None else threading.Lock()
        self.configure(rpm, tpm, window_s, models)

    def configure(
        self, rpm: int | None = None, tpm: int | None = None, window_s: float = 60.0, models: set[str] | None = None
    ) -> None:
        """Set the limits (None: no limit) for `models` (None: every model, each counted on its own); clears the
        counters."""
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        with self._lock:
            self.rpm, self.tpm, self.window_s = rpm, tpm, float(window_s)
            self.models = set(models) if models is not None else None
            self._windows: OrderedDict[tuple[str, int], Window] = OrderedDict()
            self.rate_limited = 0

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def applies_to(self, model: str) -> bool:
        return self.active and (self.models is None or model in self.models)

    def admit(self, model: str, tokens: int, now: float | None = None) -> Refusal | None:
        """Count the request in its window, or refuse it (None: admitted)."""
        now = time.time() if now is None else now
        with self._lock:
            index = math.floor(now / self.window_s)
            window = self._windows.get((model, index))
            if window is None:
                window = self._windows[(model, index)] = Window(model, index, index * self.window_s)
                while len(self._windows) > MAX_WINDOWS_KEPT:
                    self._windows.popitem(last=False)
            retry_after = max(0.001, (index + 1) * self.window_s - now)
            refusal = None
            if self.rpm is not None and window.requests + 1 > self.rpm:
                refusal = Refusal("requests", self.rpm, retry_after)
            elif self.tpm is not None and window.tokens + tokens > self.tpm:
                refusal = Refusal("tokens", self.tpm, retry_after)
            if refusal is not None:
                window.rejected += 1
                self.rate_limited += 1
                return refusal
            window.requests += 1
            window.tokens += tokens
            return None

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()
            self.rate_limited = 0

    def snapshot(self) -> dict[str, Any]:
        """The limits, every window's counters (oldest first), and the figures a test asserts on."""
        with self._lock:
            windows = [asdict(window) for window in self._windows.values()]
            return {
                "rpm": self.rpm,
                "tpm": self.tpm,
                "window_s": self.window_s,
                "models": sorted(self.models) if self.models is not None else None,
                "windows": windows,
                "windows_over_limit": sum(1 for window in windows if window["rejected"]),
                "rate_limited": self.rate_limited,
                "max_window_requests": max((window["requests"] for window in windows), default=0),
                "max_window_tokens": max((window["tokens"] for window in windows), default=0),
            }


def retry_after_headers(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (as HTTP says, rounded up) and retry-after-ms exactly (what openai reads first)."""
    return {"retry-after": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}
