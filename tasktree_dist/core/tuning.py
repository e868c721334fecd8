"""Process-wide settings that make many concurrent LLM calls cheaper: uvloop and a frozen garbage collector.

- `new_event_loop()` / `run()`: uvloop's event loop where it is installed (Linux, macOS), else asyncio's. Its
  loop, transports and timers are written in C: aiohttp's calls cost about a third less CPU. TASKTREE_UVLOOP=0
  keeps asyncio's loop.
- `freeze_gc_once()`: after a process has imported what it runs (openai, pydantic, aiohttp: most of its objects,
  alive until exit), one `gc.collect()` then `gc.freeze()` moves them out of the collector's way. Without it
  every full collection walks them all, 20 to 80 ms with the event loop stopped: a batch of LLM calls stalls
  each time. The LLM node calls it once, when it has imported its transport. TASKTREE_GC_FREEZE=0 turns it off.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

from .settings import get_settings

T = TypeVar("T")

def uvloop_enabled() -> bool:
    """uvloop is installed and TASKTREE_UVLOOP does not turn it off."""
    if not get_settings().uvloop:
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when enabled (see uvloop_enabled), else asyncio's."""
    if uvloop_enabled():
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on new_event_loop()."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


_frozen = False


def freeze_gc_once() -> bool:
    """Collect, then freeze every object alive now (once per process; see the module docstring). Returns whether
    this call froze them."""
    global _frozen
    if _frozen or not get_settings().gc_freeze:
        return False
    _frozen = True
    gc.collect()
    gc.freeze()
    return True
