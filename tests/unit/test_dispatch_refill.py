"""run_units refills freed slots before it applies the completions that freed them (pure: no fleet, the publish
and the snapshot store replaced by a recorder, completions resolved by hand as the reader would)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from types import SimpleNamespace
from typing import Any

import pytest

from tasktree_dist.core.settings import TasktreeSettings
from tasktree_dist.distributed import keys
from tasktree_dist.distributed.dispatch import Dispatcher, InFlight, Prepared
from tasktree_dist.distributed.protocol import Completion, Unit

LIMIT, COUNT, BATCH = 8, 16, 2  # messages of 2 units (min(batch, limit // 4)), two waves of 8

WAIT_S = 10.0


def unit(i: int) -> Unit:
    return Unit(run_id="r", execution_id=f"r:{i}", tree="T", fingerprint="f", address=None, index=i,
                snapshot=f"s{i}", reply_to=keys.reply("test"), queue="q")


class Harness:
    """A Dispatcher whose sending only records (in `log`) which units went, in order."""

    def __init__(self) -> None:
        sender = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.dispatcher = Dispatcher(TasktreeSettings(), "memory://", lambda units: None, sender)
        self.log: list[str] = []
        self.sent: dict[int, InFlight] = {}
        self.wave = asyncio.Event()

        async def dispatch(scope: Any, batch: list[InFlight]) -> None:
            for entry in batch:
                entry.sent = True
                self.sent[entry.unit.index or 0] = entry
            self.log.append("send " + ",".join(str(entry.unit.index) for entry in batch))
            if len(self.sent) in (LIMIT, COUNT):
                self.wave.set()

        self.dispatcher._dispatch = dispatch  # type: ignore[method-assign]
        self.dispatcher.ensure_tasks = lambda: None  # type: ignore[method-assign]
        self.scope = SimpleNamespace(replaying=False, run_id="r", stop_reason=None, units_out=0, activity=0,
                                     parking=None, unit_records=self.no_records)

    @staticmethod
    async def no_records(ids: list[str]) -> list[None]:
        return [None] * len(ids)

    def done(self, i: int, completion: Completion) -> None:
        self.log.append(f"done {i}")

    def answer(self, indices: range) -> None:
        """A burst read by the completion reader: every future resolved in one go."""
        for i in indices:
            self.dispatcher.resolve(Completion(execution_id=f"r:{i}", status="OK"))

    async def next_wave(self) -> None:
        await asyncio.wait_for(self.wave.wait(), WAIT_S)
        self.wave.clear()

    async def aclose(self) -> None:
        await self.dispatcher.redis.aclose()


@pytest.fixture
async def harness() -> Any:
    h = Harness()
    yield h
    await h.aclose()


async def test_a_burst_of_completions_refills_its_slots_before_it_is_applied(harness: Harness) -> None:
    run = asyncio.ensure_future(harness.dispatcher.run_units(
        harness.scope, COUNT, lambda i: Prepared(unit(i), b"null"), LIMIT, harness.done, batch_size=BATCH))
    await harness.next_wave()
    assert harness.log == ["send 0,1", "send 2,3", "send 4,5", "send 6,7"]
    harness.answer(range(0, LIMIT))  # the whole first wave ends together
    await harness.next_wave()
    harness.answer(range(LIMIT, COUNT))
    await asyncio.wait_for(run, WAIT_S)
    second_wave = harness.log[4:]
    # every unit of the second wave was sent before any completion of the first was applied
    assert second_wave[:4] == ["send 8,9", "send 10,11", "send 12,13", "send 14,15"]
    assert sorted(second_wave[4:], key=lambda e: int(e.split()[1])) == [f"done {i}" for i in range(COUNT)]
    assert second_wave[4:12] == [f"done {i}" for i in range(LIMIT)]  # applied in arrival order, once each


async def test_a_stop_applies_what_arrived_but_was_not_applied_yet(harness: Harness) -> None:
    run = asyncio.ensure_future(harness.dispatcher.run_units(
        harness.scope, COUNT, lambda i: Prepared(unit(i), b"null"), LIMIT, harness.done, batch_size=BATCH))
    await harness.next_wave()
    harness.answer(range(0, 3))
    run.cancel()  # the caller stops before run_units has applied (or even seen) the three
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, WAIT_S)
    assert [e for e in harness.log if e.startswith("done")] == ["done 0", "done 1", "done 2"]
