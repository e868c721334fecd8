"""Leaf nodes: Function, Log, TODO, ShowBlackboard, WriteBlackboard, Assert, Failure, Subtree, ParseJSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

import tasktree_dist
from tasktree_dist import Context, Result, Status, TraceNode, Tree
from tests.helpers import make_run, node


@dataclass
class BB:
    value: int = 0
    flag: bool = True
    raw: str = ""
    parsed: Any = None
    name: str = "parent"
    events: list[Any] = field(default_factory=list)


@dataclass
class SubBB:
    text: str
    out: str = ""


run = make_run(BB)


# -- Function -------------------------------------------------------------------------------------------------


def make_forms() -> list[tuple[str, Any, int]]:
    seen: list[tuple[Any, ...]] = []

    def f0() -> str:
        seen.append(())
        return "f0"

    def f1(b: BB) -> str:
        seen.append((b,))
        return "f1"

    def f2(b: BB, tracer: TraceNode) -> str:
        seen.append((b, tracer))
        return "f2"

    def f3(b: BB, tracer: TraceNode, context: Context) -> str:
        seen.append((b, tracer, context))
        return "f3"

    async def a0() -> str:
        seen.append(())
        return "a0"

    async def a1(b: BB) -> str:
        seen.append((b,))
        return "a1"

    async def a2(b: BB, tracer: TraceNode) -> str:
        seen.append((b, tracer))
        return "a2"

    async def a3(b: BB, tracer: TraceNode, context: Context) -> str:
        seen.append((b, tracer, context))
        return "a3"

    forms = [(f.__name__, f, n) for f, n in ((f0, 0), (f1, 1), (f2, 2), (f3, 3), (a0, 0), (a1, 1), (a2, 2), (a3, 3))]
    return [(name, (func, seen), n) for name, func, n in forms]


@pytest.mark.parametrize(("name", "func_seen", "arity"), make_forms(), ids=[f[0] for f in make_forms()])
async def test_function_forms(name: str, func_seen: tuple[Any, list[Any]], arity: int) -> None:
    func, seen = func_seen
    seen.clear()
    tree = Tree("LeafForms").Sequence()._().Function(func).End()
    bb = BB()
    result, context = await run(tree, bb)
    assert result == Result.OK(name)
    assert len(seen) == 1
    args = seen[0]
    assert len(args) == arity
    if arity >= 1:
        assert args[0] is bb
    if arity >= 2:
        assert isinstance(args[1], TraceNode)
        assert args[1].name == f"Function({name})"
        assert args[1].path == ["ROOT", "Tree(LeafForms)", "Sequence", f"Function({name})"]
    if arity == 3:
        assert args[2] is context
    assert node(context, "Sequence", f"Function({name})")["result"] == {"status": "OK", "data": name}


async def test_function_returning_result_passes_through() -> None:
    sync_tree = Tree().Function(lambda: Result.FAIL("nope")).End()
    assert (await run(sync_tree))[0] == Result(Status.FAIL, "nope")

    async def async_ok(b: BB) -> Result:
        return Result.OK({"k": b.value})

    assert (await run(Tree().Function(async_ok).End(), BB(value=5)))[0] == Result.OK({"k": 5})


@pytest.mark.parametrize("value", [None, 0, "", [1, 2], {"a": 1}, ("t",)])
async def test_function_other_values_become_ok(value: Any) -> None:
    result, _ = await run(Tree().Function(lambda: value).End())
    assert result.status is Status.OK
    assert result.data == value


async def test_function_exception_becomes_fail_with_error_in_trace() -> None:
    def boom() -> None:
        raise ValueError("boom happened")

    async def aboom(b: BB) -> None:
        raise KeyError("missing")

    tree = Tree("LeafBoom").Selector()._().Function(boom)._().Function(aboom).End()
    result, context = await run(tree)  # must not raise
    assert result == Result.FAIL(None)
    sync_node = node(context, "Selector", "Function(boom)")
    assert sync_node["result"] == {"status": "FAIL", "data": None}
    assert sync_node["attributes"]["error"] == "ValueError: boom happened"
    assert any(line.endswith("[error] : ValueError: boom happened") for line in sync_node["logs"])
    async_node = node(context, "Selector", "Function(aboom)")
    assert async_node["attributes"]["error"] == "KeyError: 'missing'"
    assert any("[error] : KeyError" in line for line in async_node["logs"])


async def test_function_exception_in_sequence_stops_it_and_run_continues_in_next_tree() -> None:
    bb = BB()
    tree = (
        Tree()
        .Sequence()
        ._().Function(lambda b: b.events.append("before"))
        ._().Function(lambda: 1 / 0)
        ._().Function(lambda b: b.events.append("after"))
        .End()
    )
    result, context = await run(tree, bb)
    assert result.status is Status.FAIL
    assert bb.events == ["before"]
    assert node(context, "Sequence", "Function(lambda)_1")["attributes"]["error"] == (
        "ZeroDivisionError: division by zero"
    )


# -- Log, TODO, ShowBlackboard, Failure -----------------------------------------------------------------------


async def test_log_string_and_factory_with_levels() -> None:
    def msg(b: BB) -> str:
        return f"debug value={b.value}"

    tree = (
        Tree("LeafLog")
        .Sequence()
        ._().Log("hello step1")
        ._().Log(lambda b: f"value={b.value}", level="warning")
        ._().Log(msg, level="debug")
        .End()
    )
    result, context = await run(tree, BB(value=3))
    assert result == Result.OK(None)
    children = node(context, "Sequence")["children"]
    assert list(children) == ["Log(info)", "Log(lambda, warning)", "Log(msg, debug)"]
    assert children["Log(info)"]["logs"][0].endswith(" [info] : hello step1")
    assert children["Log(lambda, warning)"]["logs"][0].endswith(" [warning] : value=3")
    assert children["Log(msg, debug)"]["logs"][0].endswith(" [debug] : debug value=3")
    assert children["Log(info)"]["kind"] == "Log"
    # "YYYY-mm-dd HH:MM:SS [level] : msg"
    stamp = children["Log(info)"]["logs"][0].split(" [", 1)[0]
    assert len(stamp) == 19 and stamp[4] == "-" and stamp[13] == ":"


async def test_todo_failure_and_show_blackboard() -> None:
    bb = BB(value=9)
    assert (await run(Tree().TODO("later").End(), bb))[0] == Result.OK(None)
    assert (await run(Tree().Failure().End(), bb))[0] == Result.FAIL(None)
    result, context = await run(Tree("LeafShow").ShowBlackboard().End(), bb)
    assert result.status is Status.OK
    assert result.data is bb
    assert node(context, "ShowBlackboard")["kind"] == "ShowBlackboard"
    _, context = await run(Tree("LeafTodo").TODO().End(), bb)
    assert node(context, "TODO")["kind"] == "TODO"


# -- WriteBlackboard ------------------------------------------------------------------------------------------


async def test_write_blackboard_attr() -> None:
    bb = BB()
    tree = Tree("LeafWrite").Sequence()._().Function(lambda: 123)._().WriteBlackboard("value").End()
    result, context = await run(tree, bb)
    assert result == Result.OK(123)
    assert bb.value == 123
    assert "WriteBlackboard(b.value)" in node(context, "Sequence")["children"]


async def test_write_blackboard_function() -> None:
    def set_double(b: BB, v: int) -> None:
        b.value = v * 2

    bb = BB()
    tree = Tree("LeafWriteF").Sequence()._().Function(lambda: 7)._().WriteBlackboard(set_double).End()
    result, context = await run(tree, bb)
    assert result == Result.OK(7)
    assert bb.value == 14
    assert "WriteBlackboard(set_double)" in node(context, "Sequence")["children"]


async def test_write_blackboard_writes_failed_previous_data_too() -> None:
    bb = BB()
    tree = (
        Tree()
        .Sequence()
        ._().ForceOk()
        ._()._().Function(lambda: Result.FAIL(5))
        ._().WriteBlackboard("value")
        .End()
    )
    assert (await run(tree, bb))[0] == Result.OK(5)
    assert bb.value == 5


async def test_write_blackboard_on_a_dict_blackboard() -> None:
    bb: dict[str, Any] = {}
    tree = Tree().Sequence()._().Function(lambda: "v")._().WriteBlackboard("k").End()
    assert (await run(tree, bb))[0] == Result.OK("v")
    assert bb == {"k": "v"}


async def test_write_blackboard_without_last_result_warns_and_writes_nothing() -> None:
    bb = BB(value=77)
    result, context = await run(Tree("LeafWriteNone").WriteBlackboard("value").End(), bb)
    assert result == Result.OK(None)
    assert bb.value == 77
    logs = node(context, "WriteBlackboard(b.value)")["logs"]
    assert any(line.endswith("[warning] : no last_result") for line in logs)


# -- Assert ---------------------------------------------------------------------------------------------------


def c0() -> bool:
    return True


def c1(b: BB) -> bool:
    return b.value > 0


def c2(b: BB, tracer: TraceNode) -> bool:
    tracer.log("checked")
    return b.value > 0


async def ac0() -> bool:
    return True


async def ac1(b: BB) -> bool:
    return b.value > 0


async def ac2(b: BB, tracer: TraceNode) -> bool:
    return isinstance(tracer, TraceNode) and b.value > 0


@pytest.mark.parametrize("cond", ["flag", c0, c1, c2, ac0, ac1, ac2], ids=lambda c: getattr(c, "__name__", c))
async def test_assert_true_forms(cond: Any) -> None:
    result, context = await run(Tree("LeafAssert").Assert(cond).End(), BB(value=1, flag=True))
    assert result == Result.OK(True)
    name = f"Assertion(b.{cond})" if isinstance(cond, str) else f"Assertion({cond.__name__})"
    assert node(context, name)["kind"] == "Assertion"


@pytest.mark.parametrize("cond", ["flag", c1, c2, ac1, ac2], ids=lambda c: getattr(c, "__name__", c))
async def test_assert_false_forms(cond: Any) -> None:
    assert (await run(Tree().Assert(cond).End(), BB(value=0, flag=False)))[0] == Result.FAIL(False)


async def test_assert_assertion_error_is_false_and_other_errors_fail_none() -> None:
    def check(b: BB) -> bool:
        assert b.value == 1, "value must be 1"
        return True

    assert (await run(Tree().Assert(check).End(), BB(value=1)))[0] == Result.OK(True)
    assert (await run(Tree().Assert(check).End(), BB(value=2)))[0] == Result.FAIL(False)

    def broken(b: BB) -> bool:
        raise RuntimeError("bad condition")

    result, context = await run(Tree("LeafAssertBroken").Assert(broken).End())
    assert result == Result.FAIL(None)
    assert node(context, "Assertion(broken)")["attributes"]["error"] == "RuntimeError: bad condition"


async def test_assert_condition_with_three_params_is_a_build_error() -> None:
    from tasktree_dist import TasktreeProgrammingError

    with pytest.raises(TasktreeProgrammingError):
        Tree().Assert(lambda a, b, c: True)


# -- Subtree --------------------------------------------------------------------------------------------------


async def test_subtree_shares_the_blackboard() -> None:
    sub = Tree[BB]("LeafSub").Sequence()._().Function(lambda b: b.events.append("sub"))._().Function(lambda: "x").End()
    tree = (
        Tree[BB]("LeafSubParent")
        .Sequence()
        ._().Function(lambda b: b.events.append("before"))
        ._().Subtree(sub)
        ._().Function(lambda b: b.events.append("after"))
        ._().WriteBlackboard("parsed")  # the previous node's data: None (list.append)
        .End()
    )
    bb = BB()
    result, context = await run(tree, bb)
    assert result.status is Status.OK
    assert bb.events == ["before", "sub", "after"]
    sub_node = node(context, "Sequence", "Subtree(LeafSub)")
    assert sub_node["result"] == {"status": "OK", "data": "x"}
    assert list(sub_node["children"]) == ["Tree(LeafSub)"]
    assert list(sub_node["children"]["Tree(LeafSub)"]["children"]) == ["Sequence"]


async def test_subtree_result_is_the_subtree_result() -> None:
    sub = Tree("LeafSubFail").Function(lambda: Result.FAIL("sub failed")).End()
    assert (await run(Tree().Subtree(sub).End()))[0] == Result.FAIL("sub failed")


async def test_subtree_with_blackboard_factory() -> None:
    def work(b: SubBB) -> str:
        b.out = b.text.upper()
        return b.out

    sub = Tree[SubBB]("LeafSubFactory").Function(work).End()
    made: list[SubBB] = []

    def factory(b: BB) -> SubBB:
        made.append(SubBB(text=b.name))
        return made[-1]

    tree = (
        Tree[BB]()
        .Sequence()
        ._().Subtree(sub, factory)
        ._().Function(lambda b: b.name)  # the parent blackboard is current again
        .End()
    )
    bb = BB(name="hello")
    context = Context()
    async with context.using_blackboard(bb):
        result = await tree(context)
        assert context.current_blackboard(BB) is bb
    assert result == Result.OK("hello")
    assert len(made) == 1 and made[0].out == "HELLO"
    assert not hasattr(bb, "out")


# -- ParseJSON ------------------------------------------------------------------------------------------------


async def test_parse_json_default_source_is_last_result() -> None:
    bb = BB()
    tree = Tree().Sequence()._().Function(lambda: '{"a": 1}')._().ParseJSON(dst="parsed").End()
    assert (await run(tree, bb))[0] == Result.OK({"a": 1})
    assert bb.parsed == {"a": 1}


async def test_parse_json_without_last_result_parses_empty_object() -> None:
    assert (await run(Tree().ParseJSON().End()))[0] == Result.OK({})


async def test_parse_json_src_attr_and_factory_and_dst_function() -> None:
    bb = BB(raw='{"x": [1, 2]}')
    assert (await run(Tree().ParseJSON(src="raw").End(), bb))[0] == Result.OK({"x": [1, 2]})
    assert bb.parsed is None  # no dst: nothing written

    got: list[Any] = []
    tree = Tree().ParseJSON(src=lambda b: b.raw.replace("x", "y"), dst=lambda b, d: got.append(d)).End()
    assert (await run(tree, bb))[0] == Result.OK({"y": [1, 2]})
    assert got == [{"y": [1, 2]}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('```json\n{"a": 2}\n```', {"a": 2}),
        ('```\n[1, 2]\n```', [1, 2]),
        ('  ```json {"s": "t"} ```  ', {"s": "t"}),
        ('{"a": 1', {"a": 1}),  # repaired by json-repair
        ("{'single': 'quotes'}", {"single": "quotes"}),
        ('```json\n{"k": [1, 2\n```', {"k": [1, 2]}),
        ('```json{"glued": true}```', {"glued": True}),
        ('```json\n{"cut": "off"}', {"cut": "off"}),  # an answer cut before its closing fence
        ("```true```", True),
    ],
)
async def test_parse_json_fences_and_repair(text: str, expected: Any) -> None:
    bb = BB(raw=text)
    assert (await run(Tree().ParseJSON(src="raw", dst="parsed").End(), bb))[0] == Result.OK(expected)
    assert bb.parsed == expected


async def test_parse_json_unparseable_fails_and_writes_nothing() -> None:
    bb = BB(raw="this is not json at all", parsed="untouched")
    result, context = await run(Tree("LeafParseBad").ParseJSON(src="raw", dst="parsed").End(), bb)
    assert result.status is Status.FAIL
    assert bb.parsed == "untouched"
    assert any("[error] :" in line for line in node(context, "ParseJSON")["logs"])


async def test_parse_json_custom_loader() -> None:
    calls: list[str] = []

    def loader(text: str) -> Any:
        calls.append(text)
        return {"custom": text}

    bb = BB(raw="```json\nanything\n```")
    assert (await run(Tree().ParseJSON(src="raw", json_loader=loader).End(), bb))[0].data == {"custom": "anything"}
    assert calls == ["anything"]  # the fence is removed before any loader sees the text, as in tinytasktree

    assert (await run(Tree().ParseJSON(src="raw", json_loader=lambda s: None).End(), bb))[0].status is Status.FAIL


async def test_parse_json_final_output_object_is_parsed_as_its_text() -> None:
    record = SimpleNamespace(final_output='```json\n{"answer": 42}\n```', tool_calls=[])
    bb = BB()
    tree = Tree().Sequence()._().Function(lambda: record)._().ParseJSON(dst="parsed").End()
    assert (await run(tree, bb))[0] == Result.OK({"answer": 42})
    assert bb.parsed == {"answer": 42}


async def test_parse_json_loader_output_is_the_json_value() -> None:
    payload = {"nested": {"list": [1, "two", None, True]}}
    bb = BB(raw=json.dumps(payload))
    assert (await run(Tree().ParseJSON(src="raw").End(), bb))[0] == Result.OK(payload)


async def test_parse_json_default_loader_uses_the_package_json_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tasktree_dist.json_repair` is the repairer the default loader calls: tinytasktree's tests swap it."""
    seen: list[str] = []

    class Repairer:
        @staticmethod
        def loads(text: str) -> Any:
            seen.append(text)
            return {"repaired": True}

    bb = BB(raw='```json\n{"e": 5\n```')
    monkeypatch.setattr(tasktree_dist, "json_repair", Repairer())
    assert (await run(Tree().ParseJSON(src="raw").End(), bb))[0] == Result.OK({"repaired": True})
    assert seen == ['{"e": 5']

    monkeypatch.setattr(tasktree_dist, "json_repair", None)  # no repairer: strict JSON only
    assert (await run(Tree().ParseJSON(src="raw").End(), bb))[0].status is Status.FAIL
    assert (await run(Tree().ParseJSON(src="raw").End(), BB(raw='{"e": 5}')))[0] == Result.OK({"e": 5})
