"""WaitFor in-process: signals through `context.signal`, early signals kept, ids recorded once, schemas (pydantic,
JSON Schema, any JSON), timeouts with and without default, per-blackboard names in a Gather, a wait per loop turn,
and every bad input refused with a one-line error naming it."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import pytest

from tasktree_dist import Context, SignalError, Status, TasktreeProgrammingError, Tree, WaitFor, WaitTimeout
from tasktree_dist.core.signals import NO_DEFAULT, PayloadSchema


class Review(pydantic.BaseModel):
    decision: Literal["approve", "reject"]
    note: str = ""


@dataclass
class B:
    i: int = 0
    got: list[Any] = field(default_factory=list)


def keep(b: B, tracer: Any, context: Any) -> None:
    b.got.append(context.last_result.data)


async def run(tree: Tree[Any], b: Any, answer: Any = None) -> tuple[Any, Context]:
    context = Context()
    async with context.using_blackboard(b):
        task = asyncio.ensure_future(tree(context))
        if answer is not None:
            await answer(context)
        return await asyncio.wait_for(task, 10), context


def wait_node(context: Context) -> Any:
    return next(node for node in context.trace_root().walk() if node.kind == "WaitFor")


async def test_a_signal_answers_the_wait_with_a_model_instance_and_the_trace_says_who_and_when() -> None:
    tree = Tree[B]("UWaitModel").Sequence()._().WaitFor("review", schema=Review, prompt="ok?")._().Function(keep).End()

    async def answer(context: Context) -> None:
        await asyncio.sleep(0.05)  # let the wait be reached (an early signal is covered below)
        with pytest.raises(SignalError, match=r"wait 'review' \(UWaitModel/Sequence/WaitFor\(review\)\): payload "
                                              r"does not fit Review: decision: Input should be 'approve' or 'reject'"):
            await context.signal("review", {"decision": "maybe"})
        assert await context.signal("review", {"decision": "approve"}, signal_id="s1")

    b = B()
    result, context = await run(tree, b, answer)
    assert result.is_ok() and b.got == [Review(decision="approve")]
    node = wait_node(context)
    assert node.attributes["signal_id"] == "s1" and node.attributes["prompt"] == "ok?"
    assert node.attributes["payload"] == {"decision": "approve", "note": ""} and node.attributes["waited_ms"] > 0


async def test_an_early_signal_is_kept_and_a_signal_id_is_recorded_once() -> None:
    tree = (Tree[B]("UWaitEarly").Sequence()._().WaitFor("go")._().Function(keep)
            ._().WaitFor("go")._().Function(keep).End())
    context = Context()
    assert await context.signal("go", 1, signal_id="a")
    assert not await context.signal("go", 99, signal_id="a")  # the same id: nothing changes
    assert await context.signal("go", 2)
    b = B()
    async with context.using_blackboard(b):
        result = await asyncio.wait_for(tree(context), 10)
    assert result.is_ok() and b.got == [1, 2]


async def test_json_schema_and_any_json() -> None:
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0}}}
    tree = Tree[B]("UWaitJSON").Sequence()._().WaitFor("n", schema=schema)._().Function(keep).End()

    async def answer(context: Context) -> None:
        await asyncio.sleep(0.05)
        with pytest.raises(SignalError, match=r"payload does not fit the schema: n: -1 is less than the minimum of 0"):
            await context.signal("n", {"n": -1})
        with pytest.raises(SignalError, match=r"payload does not fit the schema: \(the payload itself\): 'n' is a "
                                              r"required property"):
            await context.signal("n", {})
        await context.signal("n", {"n": 3})

    b = B()
    result, _ = await run(tree, b, answer)
    assert result.is_ok() and b.got == [{"n": 3}]
    with pytest.raises(SignalError, match="the payload is not JSON"):
        PayloadSchema(None).check({1, 2}, "wait")


async def test_timeout_returns_the_default_or_fails_naming_the_wait_and_deadline() -> None:
    with_default = (Tree[B]("UWaitDefault").Sequence()._().WaitFor("x", timeout_s=0.05, default="d")
                    ._().Function(keep).End())
    b = B()
    result, context = await run(with_default, b)
    assert result.is_ok() and b.got == ["d"] and wait_node(context).attributes["timed_out"] is True

    without = Tree[B]("UWaitNoDefault").Sequence()._().WaitFor("x", timeout_s=0.05)._().Function(keep).End()
    result, context = await run(without, B())
    assert result.status == Status.FAIL
    error = wait_node(context).attributes["error"]
    assert "WaitFor(x) at UWaitNoDefault/Sequence/WaitFor(x): wait 'x' timed out: no signal by its deadline" in (
        str(error))
    assert issubclass(WaitTimeout, TimeoutError)


async def test_names_per_blackboard_in_a_gather_and_a_wait_per_loop_turn() -> None:
    item = Tree[B]("UWaitItem").Sequence()._().WaitFor(lambda b: f"item:{b.i}")._().Function(keep).End()
    boards = [B(i) for i in range(5)]
    gather = Tree[B]("UWaitGather").Gather(lambda b: ([item] * 5, boards), concurrency_limit=5).End()

    async def answer(context: Context) -> None:
        for i in reversed(range(5)):
            await context.signal(f"item:{i}", i * 10)

    result, _ = await run(gather, B(), answer)
    assert result.is_ok() and [b.got for b in boards] == [[0], [10], [20], [30], [40]]

    def turn(b: B) -> None:
        b.i += 1

    loop = (Tree[B]("UWaitLoop").While(lambda b: b.i < 3)._().Sequence()
            ._()._().WaitFor("answer", prompt=lambda b: f"turn {b.i}")._()._().Function(keep)
            ._()._().Function(turn).End())

    async def answers(context: Context) -> None:
        for n in range(3):
            await context.signal("answer", f"a{n}")

    b = B()
    result, context = await run(loop, b, answers)
    assert result.is_ok() and b.got == ["a0", "a1", "a2"]
    prompts = [n.attributes["prompt"] for n in context.trace_root().walk() if n.kind == "WaitFor"]
    assert prompts == ["turn 0", "turn 1", "turn 2"]


async def test_a_name_factory_that_raises_fails_the_wait_naming_it() -> None:
    def bad(b: B) -> str:
        raise KeyError("doc_id")

    tree = Tree[B]("UWaitBadName").WaitFor(bad).End()
    result, context = await run(tree, B())
    assert result.status == Status.FAIL
    assert ("WaitFor(bad) at UWaitBadName/WaitFor(bad): the wait name factory raised KeyError: 'doc_id'"
            in str(wait_node(context).attributes["error"]))


def test_bad_definitions_are_refused_when_the_tree_is_built() -> None:
    with pytest.raises(TasktreeProgrammingError, match=r"schema is not a valid JSON Schema: 'strin' is not valid"):
        WaitFor("x", schema={"type": "strin"})
    with pytest.raises(TasktreeProgrammingError, match=r"timeout_s must be a number of seconds > 0 \(a deadline in "
                                                       r"the past never waits\), got -1"):
        WaitFor("x", timeout_s=-1)
    with pytest.raises(TasktreeProgrammingError, match="schema must be a pydantic model class, a JSON Schema dict"):
        WaitFor("x", schema=int)
    with pytest.raises(TasktreeProgrammingError, match="the wait name must be a non-empty string"):
        WaitFor("")
    with pytest.raises(TasktreeProgrammingError, match=r"a WaitFor cannot run under \.Remote\(\)"):
        Tree[B]("UWaitRemote").Remote()._().WaitFor("x").End()
    # a schema that names a remote $ref would make a fleet process fetch it: refused, nothing fetched
    with pytest.raises(TasktreeProgrammingError, match=r"\$ref http://127.0.0.1:9/x.json cannot be resolved"):
        WaitFor("x", schema={"$ref": "http://127.0.0.1:9/x.json"})


def test_the_builder_method_repeats_the_node_signature() -> None:
    node = inspect.signature(WaitFor.__init__).parameters
    builder = inspect.signature(Tree.WaitFor).parameters
    assert list(node) == list(builder)
    assert builder["default"].default is NO_DEFAULT
