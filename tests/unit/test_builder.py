"""The fluent builder: depth with `._()`, `.End()`, custom nodes, prebuilt children, names, registry, build errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import tasktree_dist
from tasktree_dist import (
    TODO,
    Context,
    DecoratorNode,
    Failure,
    Function,
    InMemoryCacheStore,
    LeafNode,
    Parallel,
    RandomSelector,
    Result,
    Selector,
    Sequence,
    Status,
    TasktreeError,
    TasktreeProgrammingError,
    Tree,
)
from tests.helpers import make_run


@dataclass
class BB:
    value: int = 0
    flag: bool = True
    events: list[str] = field(default_factory=list)


run = make_run(BB)


def tree_json(context: Context) -> dict[str, Any]:
    root = context.trace_root().json()
    assert len(root["children"]) == 1
    return next(iter(root["children"].values()))


# -- basic building -------------------------------------------------------------------------------------------


async def test_named_tree_with_blackboard_type() -> None:
    tree = Tree[BB]("BuilderNamed").Sequence()._().Function(lambda b: b.value + 1).End()
    assert tree.name == "BuilderNamed"
    assert tree.fullname == "Tree(BuilderNamed)"
    assert repr(tree) == "<Tree(BuilderNamed)>"
    assert tree.blackboard_type is BB
    result, context = await run(tree, BB(value=41))
    assert result == Result.OK(42)
    root = context.trace_root().json()
    assert list(root["children"]) == ["Tree(BuilderNamed)"]
    assert list(root["children"]["Tree(BuilderNamed)"]["children"]) == ["Sequence"]


async def test_unnamed_tree_has_fullname_tree() -> None:
    tree = Tree().Function(lambda: "hello").End()
    assert tree.name == ""
    assert tree.fullname == "Tree"
    assert repr(tree) == "<Tree>"
    assert tree.blackboard_type is None
    result, context = await run(tree)
    assert result == Result.OK("hello")
    assert list(context.trace_root().json()["children"]) == ["Tree"]


async def test_builder_methods_return_the_same_tree() -> None:
    tree = Tree()
    assert tree.Sequence() is tree
    assert tree._() is tree
    assert tree.TODO() is tree
    assert tree.End() is tree


async def test_depth_places_nodes_under_the_latest_node_one_level_up() -> None:
    def step(name: str) -> Callable[[BB], str]:
        def f(b: BB) -> str:
            b.events.append(name)
            return name

        f.__name__ = name
        return f

    tree = (
        Tree[BB]("BuilderDepth")
        .Sequence()
        ._().Function(step("a"))
        ._().Selector()
        ._()._().Failure()
        ._()._().Sequence()
        ._()._()._().Function(step("b"))
        ._()._()._().Function(step("c"))
        ._()._().Function(step("never"))
        ._().Function(step("d"))
        .End()
    )
    bb = BB()
    result, context = await run(tree, bb)
    assert result == Result.OK("d")
    assert bb.events == ["a", "b", "c", "d"]
    assert sorted(tree.nodes) == sorted(
        [
            "BuilderDepth/Sequence",
            "BuilderDepth/Sequence/Function(a)",
            "BuilderDepth/Sequence/Selector",
            "BuilderDepth/Sequence/Selector/Failure",
            "BuilderDepth/Sequence/Selector/Sequence",
            "BuilderDepth/Sequence/Selector/Sequence/Function(b)",
            "BuilderDepth/Sequence/Selector/Sequence/Function(c)",
            "BuilderDepth/Sequence/Selector/Function(never)",
            "BuilderDepth/Sequence/Function(d)",
        ]
    )
    trace = tree_json(context)["children"]["Sequence"]["children"]
    assert list(trace) == ["Function(a)", "Selector", "Function(d)"]
    assert list(trace["Selector"]["children"]) == ["Failure", "Sequence"]


async def test_run_before_end_builds_the_tree() -> None:
    tree = Tree().Sequence()._().Function(lambda: 7)
    result, _ = await run(tree)
    assert result == Result.OK(7)
    assert tree.fingerprint
    with pytest.raises(TasktreeProgrammingError, match="already ended"):
        tree.TODO()


# -- custom nodes ---------------------------------------------------------------------------------------------


class Double(LeafNode):
    KIND = "Double"

    def __init__(self, attr: str, name: str = "") -> None:
        self.attr = attr
        super().__init__(name or attr)

    async def _impl(self, context: Context, tracer: tasktree_dist.Tracer) -> Result:
        b = context.current_blackboard(BB)
        setattr(b, self.attr, getattr(b, self.attr) * 2)
        tracer.log(f"doubled {self.attr}")
        return Result.OK(getattr(b, self.attr))


class Tag(DecoratorNode):
    KIND = "Tag"

    async def _impl(self, context: Context, tracer: tasktree_dist.Tracer) -> Result:
        result = await self.child()(context)
        tracer.update_attributes(tagged=True)
        return Result(result.status, ("tagged", result.data))


class MyTree(Tree[BB]):
    def Double(self, attr: str, name: str = "") -> MyTree:  # noqa: N802
        return self._attach(Double(attr, name))  # type: ignore[return-value]

    def Tag(self, name: str = "") -> MyTree:  # noqa: N802
        return self._attach(Tag(name=name))  # type: ignore[return-value]


async def test_custom_leaf_and_decorator_nodes_via_tree_subclass() -> None:
    tree = MyTree("BuilderCustom").Tag()._().Sequence()._()._().Double("value")._()._().Double("value").End()
    bb = BB(value=3)
    result, context = await run(tree, bb)
    assert result == Result.OK(("tagged", 12))
    assert bb.value == 12
    tag = tree_json(context)["children"]["Tag"]
    assert tag["kind"] == "Tag"
    assert tag["attributes"]["tagged"] is True
    doubles = tag["children"]["Sequence"]["children"]
    assert list(doubles) == ["Double(value)", "Double(value)_1"]
    assert doubles["Double(value)"]["kind"] == "Double"
    assert doubles["Double(value)"]["logs"][0].endswith("[info] : doubled value")
    assert "BuilderCustom/Tag/Sequence/Double(value)_1" in tree.nodes


async def test_custom_decorator_without_child_fails_at_end() -> None:
    with pytest.raises(TasktreeProgrammingError, match="Tag"):
        MyTree().Tag().End()
    with pytest.raises(TasktreeProgrammingError, match="at most 1"):
        MyTree().Tag()._().TODO()._().TODO()


class Upper(tasktree_dist.SingleChildNode[BB], DecoratorNode[BB]):
    """A decorator declared and constructed tinytasktree's way."""

    KIND = "Upper"

    def __init__(self, suffix: str, name: str = "") -> None:
        DecoratorNode.__init__(self, name)
        tasktree_dist.SingleChildNode.__init__(self, None, name)
        self.suffix = suffix

    async def _impl(self, context: Context, tracer: tasktree_dist.Tracer) -> Result:
        result = await self.child()(context)
        return Result(result.status, f"{result.data}{self.suffix}".upper())


class Marker(LeafNode[BB]):
    KIND = "Marker"

    def __init__(self, built: list[str], name: str = "") -> None:
        super().__init__(name)
        self.built = built

    def OnBuildEnd(self) -> None:  # noqa: N802
        super().OnBuildEnd()
        self.built.append(self.fullname)

    async def _impl(self, context: Context, tracer: tasktree_dist.Tracer) -> Result:
        return Result.OK("marked")


class TinyStyleTree(Tree[BB]):
    def Upper(self, suffix: str, name: str = "") -> TinyStyleTree:  # noqa: N802
        return self._attach(Upper(suffix, name))  # type: ignore[return-value]

    def Marker(self, built: list[str], name: str = "") -> TinyStyleTree:  # noqa: N802
        return self._attach(Marker(built, name))  # type: ignore[return-value]


async def test_custom_nodes_written_tinytasktrees_way() -> None:
    """Generic bases (`LeafNode[BB]`), `class X(SingleChildNode[B], DecoratorNode[B])`, `tree.child()`."""
    built: list[str] = []
    tree = TinyStyleTree("TinyStyle").Upper("!")._().Marker(built).End()
    assert built == ["Marker"]
    assert isinstance(tree.child(), Upper) and tree.child().child().fullname == "Marker"
    result, _ = await run(tree, BB())
    assert result == Result.OK("MARKED!")
    with pytest.raises(TasktreeProgrammingError, match="at most 1"):
        TinyStyleTree().Upper("!")._().TODO()._().TODO()
    with pytest.raises(TasktreeProgrammingError, match="no child"):
        Tree("Empty").child()


# -- prebuilt children ----------------------------------------------------------------------------------------


async def test_prebuilt_children_for_sequence_selector_parallel_random_selector() -> None:
    bb = BB()

    def record(name: str) -> Callable[[BB], str]:
        def f(b: BB) -> str:
            b.events.append(name)
            return name

        f.__name__ = name
        return f

    seq = Tree().Sequence(children=[Function(record("s1")), Function(record("s2"))]).End()
    assert (await run(seq, bb))[0] == Result.OK("s2")

    sel = Tree().Selector(children=[Failure(), Function(record("sel")), Function(record("never"))]).End()
    assert (await run(sel, bb))[0] == Result.OK("sel")

    par = Tree().Parallel(children=[Function(record("p1")), Function(record("p2"))], concurrency_limit=2).End()
    result, context = await run(par, bb)
    assert result == Result.OK(None)
    assert list(tree_json(context)["children"]["Parallel"]["children"]) == ["Function(p1)", "Function(p2)"]

    rnd = Tree().RandomSelector(children=[Failure(), Failure(), Function(record("r"))], weights=[1, 2, 3]).End()
    assert (await run(rnd, bb))[0] == Result.OK("r")

    assert bb.events == ["s1", "s2", "sel", "p1", "p2", "r"]


async def test_prebuilt_children_can_be_extended_with_depth() -> None:
    tree = Tree().Sequence(children=[Function(lambda: 1)])._().Function(lambda: 2).End()
    result, context = await run(tree)
    assert result == Result.OK(2)
    assert list(tree_json(context)["children"]["Sequence"]["children"]) == ["Function(lambda)", "Function(lambda)_1"]


async def test_prebuilt_nodes_classes_are_exported() -> None:
    seq = Sequence([TODO(), Selector([Failure(), TODO()]), Parallel([TODO()]), RandomSelector([TODO()])])
    tree = Tree().Sequence(children=[seq]).End()
    assert (await run(tree))[0] == Result.OK(None)


# -- names ----------------------------------------------------------------------------------------------------


def a() -> str:
    return "a"


async def test_unique_sibling_names_in_traces_and_addresses() -> None:
    tree = (
        Tree("BuilderNames")
        .Sequence()
        ._().Function(a)
        ._().Function(a)
        ._().Function(lambda: 1)
        ._().Function(lambda: 2)
        ._().Function(a)
        .End()
    )
    _, context = await run(tree)
    names = list(tree_json(context)["children"]["Sequence"]["children"])
    assert names == ["Function(a)", "Function(a)_1", "Function(lambda)", "Function(lambda)_1", "Function(a)_2"]
    assert [child.trace_name for child in tree.root.children()] == names  # type: ignore[union-attr]
    assert {f"BuilderNames/Sequence/{n}" for n in names} <= set(tree.nodes)


async def test_explicit_node_name() -> None:
    tree = Tree().Sequence(name="Steps")._().Function(a, name="first").End()
    _, context = await run(tree)
    assert list(tree_json(context)["children"]) == ["Sequence(Steps)"]
    assert list(tree_json(context)["children"]["Sequence(Steps)"]["children"]) == ["Function(first)"]


# -- registry, fingerprint, addresses -------------------------------------------------------------------------


def test_trees_are_registered_by_name_with_fingerprint_and_addresses() -> None:
    tree = Tree("BuilderRegistry").Sequence()._().Function(a)._().Function(a).End()
    assert tasktree_dist.get_tree("BuilderRegistry") is tree
    assert len(tree.fingerprint) == 16
    assert set(tree.nodes) == {
        "BuilderRegistry/Sequence",
        "BuilderRegistry/Sequence/Function(a)",
        "BuilderRegistry/Sequence/Function(a)_1",
    }
    node = tree.node("BuilderRegistry/Sequence/Function(a)_1")
    assert isinstance(node, Function)
    assert node.address == "BuilderRegistry/Sequence/Function(a)_1"
    assert node is tree.root.children()[1]  # type: ignore[union-attr]
    with pytest.raises(LookupError, match="no node at address"):
        tree.node("BuilderRegistry/Sequence/Function(b)")

    same = Tree("BuilderRegistry").Sequence()._().Function(a)._().Function(a).End()
    assert same.fingerprint == tree.fingerprint
    assert tasktree_dist.get_tree("BuilderRegistry") is same  # the latest build replaces the earlier one

    changed = Tree("BuilderRegistry").Sequence()._().Function(a)._().Function(a)._().TODO().End()
    assert changed.fingerprint != tree.fingerprint
    assert tasktree_dist.get_tree("BuilderRegistry") is changed

    params = Tree("BuilderRegistryP").Retry(2)._().Function(a).End().fingerprint
    assert Tree("BuilderRegistryP").Retry(3)._().Function(a).End().fingerprint != params
    kinds = Tree("BuilderRegistryK").Sequence()._().Function(a).End().fingerprint
    assert Tree("BuilderRegistryK").Selector()._().Function(a).End().fingerprint != kinds


def test_unknown_tree_name_raises() -> None:
    with pytest.raises(LookupError, match="BuilderNoSuchTree"):
        tasktree_dist.get_tree("BuilderNoSuchTree")


def test_unnamed_trees_are_not_registered() -> None:
    Tree().TODO().End()
    with pytest.raises(LookupError):
        tasktree_dist.get_tree("")


# -- build errors ---------------------------------------------------------------------------------------------


def store() -> InMemoryCacheStore:
    return InMemoryCacheStore()


def four(a: Any, b: Any, c: Any, d: Any) -> None:
    return None


BUILD_ERRORS: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    ("else_outside_if", lambda: Tree().Sequence()._().Else(), TasktreeProgrammingError, ["Else", "If", "Sequence"]),
    ("else_first_child", lambda: Tree().If("flag")._().Else(), TasktreeProgrammingError, ["Else", "second child"]),
    (
        "fallback_outside_timeout",
        lambda: Tree().Sequence()._().Fallback(),
        TasktreeProgrammingError,
        ["Fallback", "Timeout", "Terminable"],
    ),
    (
        "fallback_first_child",
        lambda: Tree().Timeout(1.0)._().Fallback(),
        TasktreeProgrammingError,
        ["Fallback", "second child"],
    ),
    ("decorator_no_child", lambda: Tree().Sequence()._().Invert().End(), TasktreeProgrammingError, ["Invert", "0"]),
    ("root_decorator_no_child", lambda: Tree().ForceOk().End(), TasktreeProgrammingError, ["ForceOk", "0"]),
    (
        "decorator_two_children",
        lambda: Tree().Invert()._().TODO()._().Failure(),
        TasktreeProgrammingError,
        ["Invert", "Failure", "at most 1"],
    ),
    (
        "if_three_children",
        lambda: Tree().If("flag")._().TODO()._().TODO()._().Failure(),
        TasktreeProgrammingError,
        ["If(b.flag)", "at most 2"],
    ),
    (
        "timeout_three_children",
        lambda: Tree().Timeout(1.0)._().TODO()._().TODO()._().Failure(),
        TasktreeProgrammingError,
        ["Timeout", "at most 2"],
    ),
    (
        "terminable_three_children",
        lambda: Tree().Terminable(lambda b: "k", store=store())._().TODO()._().TODO()._().Failure(),
        TasktreeProgrammingError,
        ["Terminable", "at most 2"],
    ),
    ("if_no_child", lambda: Tree().If("flag").End(), TasktreeProgrammingError, ["If(b.flag)", "0"]),
    (
        "parallel_limit_zero",
        lambda: Tree().Parallel(concurrency_limit=0),
        TasktreeProgrammingError,
        ["Parallel", "concurrency_limit"],
    ),
    (
        "parallel_limit_negative",
        lambda: Tree().Parallel(concurrency_limit=-2),
        TasktreeProgrammingError,
        ["Parallel", "concurrency_limit"],
    ),
    (
        "gather_limit_zero",
        lambda: Tree().Gather(lambda b: ([], []), concurrency_limit=0),
        TasktreeProgrammingError,
        ["Gather", "concurrency_limit"],
    ),
    (
        "weights_wrong_length",
        lambda: Tree().RandomSelector(weights=[1.0, 2.0])._().TODO().End(),
        TasktreeProgrammingError,
        ["RandomSelector", "weights"],
    ),
    (
        "weights_zero",
        lambda: Tree().RandomSelector(weights=[1.0, 0]),
        TasktreeProgrammingError,
        ["RandomSelector", "positive"],
    ),
    (
        "weights_negative",
        lambda: Tree().RandomSelector(weights=[-1.0]),
        TasktreeProgrammingError,
        ["RandomSelector", "positive"],
    ),
    ("retry_zero_tries", lambda: Tree().Retry(0), TasktreeProgrammingError, ["Retry", "max_tries"]),
    (
        "too_much_indent",
        lambda: Tree().Sequence()._()._().TODO(),
        TasktreeProgrammingError,
        ["TODO", "too much indent"],
    ),
    ("indent_on_empty_tree", lambda: Tree()._().TODO(), TasktreeProgrammingError, ["TODO", "too much indent"]),
    (
        "end_empty_tree",
        lambda: Tree("BuilderEmpty").End(),
        TasktreeProgrammingError,
        ["Tree(BuilderEmpty)", "nothing"],
    ),
    (
        "end_twice",
        lambda: Tree("BuilderTwice").TODO().End().End(),
        TasktreeProgrammingError,
        ["BuilderTwice", "nothing"],
    ),
    ("second_root", lambda: Tree().TODO().Failure(), TasktreeProgrammingError, ["Failure", "root", "TODO"]),
    (
        "child_under_leaf",
        lambda: Tree().Sequence()._().TODO()._()._().Failure(),
        TasktreeProgrammingError,
        ["Failure", "TODO", "leaf"],
    ),
    ("function_four_params", lambda: Tree().Function(four), TasktreeProgrammingError, ["Function(four)", "4"]),
    ("cacher_without_store", lambda: Tree().Cacher(lambda b: "k"), TasktreeError, ["Cacher", "store"]),
    ("terminable_without_store", lambda: Tree().Terminable(lambda b: "k"), TasktreeError, ["Terminable", "store"]),
]


@pytest.mark.parametrize(("build", "error", "words"), [c[1:] for c in BUILD_ERRORS], ids=[c[0] for c in BUILD_ERRORS])
def test_build_errors_name_the_node(build: Callable[[], Any], error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        build()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_missing_store_is_a_tasktree_error_not_a_programming_error() -> None:
    for build in (lambda: Tree().Cacher(lambda b: "k"), lambda: Tree().Terminable(lambda b: "k")):
        with pytest.raises(TasktreeError) as info:
            build()
        assert not isinstance(info.value, TasktreeProgrammingError)


def test_build_errors_are_raised_at_the_documented_moment() -> None:
    # 0 children: only at End(), since the child may still come.
    tree = Tree().Sequence()._().Invert()
    tree._()._().TODO()
    tree.End()
    # wrong weight count: only at End().
    pending = Tree().RandomSelector(weights=[1.0, 2.0])._().TODO()
    with pytest.raises(TasktreeProgrammingError, match="weights"):
        pending.End()
    # Function arity: at attach (no End needed).
    with pytest.raises(TasktreeProgrammingError, match="Function"):
        Function(lambda a, b, c, d, e: None)


def test_result_status_basics() -> None:
    assert Result.OK(1) == Result(Status.OK, 1)
    assert Result.FAIL() == Result(Status.FAIL, None)
    assert repr(Result.OK(5)) == "OK(5)"
    assert str(Status.FAIL) == "FAIL"
    assert Status.OK.invert() is Status.FAIL
