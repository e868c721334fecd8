"""Specs: every node kind round-trips with its fingerprint; bad documents are refused naming the place."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from tasktree_dist import Context, SpecError, Tree
from tasktree_dist.builder.spec import validate
from tasktree_dist.builder.spec_kinds import kinds
from tasktree_dist.builder.spec_schema import spec_schema
from tests.spec_trees import Doc, every_kind_tree

SIMPLE = """\
tasktree: 1
name: spec_simple
blackboard:
  type: object
  properties:
    text: {type: string}
    words: {type: integer}
  required: [text]
root:
  kind: Sequence
  children:
    - kind: Function
      func: count_words_dict
    - kind: WriteBlackboard
      attr_or_func: words
"""


@pytest.fixture(autouse=True, scope="module")
def _dict_function() -> None:
    from tasktree_dist import register_function

    register_function("count_words_dict", lambda b: len(b["text"].split()))


def test_every_node_kind_round_trips_with_the_same_fingerprint() -> None:
    tree = every_kind_tree()
    document = tree.to_spec()
    used = set()

    def walk(node: dict) -> None:
        used.add(node["kind"])
        for child in node.get("children", []):
            walk(child)

    walk(document["root"])
    assert used == set(kinds())  # the test tree really holds every kind of the vocabulary
    for text in (yaml.safe_dump(document), json.dumps(document), document):
        rebuilt = Tree.from_spec(text)
        assert rebuilt.fingerprint == tree.fingerprint
        assert rebuilt.blackboard_type is Doc
        assert rebuilt.to_spec() == document
        assert list(rebuilt.nodes) == list(tree.nodes)


def test_every_kind_document_fits_the_json_schema() -> None:
    schema = spec_schema()
    Draft202012Validator.check_schema(schema)
    Draft202012Validator(schema).validate(every_kind_tree().to_spec())
    assert list(Draft202012Validator(schema).iter_errors({"tasktree": 1, "name": "x", "root": {"kind": "Nope"}}))
    typo = {"kind": "Failure", "nmae": "y"}
    nested_typo = {"tasktree": 1, "name": "x", "root": {"kind": "Sequence", "children": [typo]}}
    assert list(Draft202012Validator(schema).iter_errors(nested_typo))  # a known kind's own branch still applies


async def test_a_spec_tree_runs_on_a_dict_blackboard() -> None:
    tree = Tree.from_spec(SIMPLE)
    board = {"text": "one two three"}
    context = Context()
    async with context.using_blackboard(board):
        result = await tree(context)
    assert result.is_ok() and board["words"] == 3
    assert tree.blackboard_schema["required"] == ["text"]


async def test_messages_templates_read_the_blackboard() -> None:
    from tasktree_dist.builder.spec_text import render_template

    assert render_template("about {topic} {{literal}}", {"topic": "owls"}) == "about owls {literal}"
    text = SIMPLE.replace("    - kind: WriteBlackboard\n      attr_or_func: words\n", """\
    - kind: LLM
      model: m
      messages: [{role: user, content: "count {text} and {missing}"}]
""")
    with pytest.raises(SpecError) as caught:
        Tree.from_spec(text, source="t.yaml")
    assert "t.yaml:16:40:" in str(caught.value) and "{missing} is not a field" in str(caught.value)


def test_vars_fill_dollar_names_and_a_missing_one_is_named() -> None:
    text = SIMPLE.replace("func: count_words_dict", "func: $fn")
    tree = Tree.from_spec(text, {"fn": "count_words_dict"})
    problems = validate(text)
    assert [str(p) for p in problems] == [
        "13:13: $fn has no value (give it with --var fn=... or in the document's `vars:`)"]
    with_default = text.replace("root:", "vars: {fn: count_words_dict}\nroot:")
    assert Tree.from_spec(with_default).fingerprint == tree.fingerprint


@pytest.mark.parametrize(("text", "where", "message"), [
    ("root: [unclosed", "1:16", "not YAML/JSON"),
    ("{\"tasktree\": 1, \"name\": ", "1:25", "not YAML/JSON"),
    ("tasktree: 1\nname: x\nroot: {kind: Sequense}\n", "3:14", "unknown node kind 'Sequense'"),
    ("tasktree: 1\nname: x\nroot: {kind: Retry, max_try: 3, children: [{kind: TODO}]}\n", "3:30",
     "unknown parameter 'max_try' for Retry"),
    ("tasktree: 1\nname: x\nroot: {kind: Function, func: nobody}\n", "3:30", "function 'nobody' is not registered"),
    ("tasktree: 1\nname: x\nroot: {kind: Function, func: os.system}\n", "3:30",
     "'os.system' looks like a module/attribute path"),
    ("tasktree: 1\nname: x\nroot: {kind: Function, func: 'subprocess:run'}\n", "3:30",
     "looks like a module/attribute path"),
    ("tasktree: 1\nname: x\nroot: {kind: tasktree_dist.nodes.leaves.Function}\n", "3:14",
     "looks like a module/attribute path"),
    ("tasktree: 1\nname: x\nroot: {kind: Retry, max_tries: 3}\n", "3:7", "Retry needs exactly 1 child node(s), has 0"),
    ("tasktree: 1\nname: x\nroot: {kind: Sequence, children: [{kind: Fallback, children: [{kind: TODO}]}]}\n",
     "3:35", "must be a child of Timeout or Terminable"),
    ("tasktree: 1\nname: x\nroot: {kind: Retry, max_tries: zero, children: [{kind: TODO}]}\n", "3:32",
     "max_tries: 'zero' is not of type 'integer'"),
    ("tasktree: 1\nname: x\nblackboard: {type: objekt}\nroot: {kind: TODO}\n", "3:20",
     "blackboard is not a valid JSON Schema"),
    ("tasktree: 1\nname: x\nblackboard: NoSuchType\nroot: {kind: TODO}\n", "3:13",
     "type 'NoSuchType' is not registered"),
    ("tasktree: 1\nname: x\nroot: {kind: Subtree, subtree: nowhere}\n", "3:32", "tree 'nowhere' is not registered"),
    ("tasktree: 2\nname: x\nroot: {kind: TODO}\n", "1:11", "`tasktree: 1` is required"),
    ("tasktree: 1\nname: x\nroot: {kind: WaitFor}\n", "3:7", "WaitFor needs `name`"),
    ("tasktree: 1\nname: x\nroot: {kind: WaitFor, name: ok, schema: {$ref: 'http://x/s.json'}}\n", "3:48",
     "no remote references"),
    ("tasktree: 1\nname: x\nroot: {kind: Remote, children: [{kind: WaitFor, name: ok}]}\n", "3:7",
     "a WaitFor cannot run under .Remote()"),
    ("tasktree: 1\nname: x\nroot: !!python/object:os.system {kind: TODO}\n", "3:7", "tag"),
    ("tasktree: 1\nname: x\na: &a [1]\nb: *a\nroot: {kind: TODO}\n", "3:4", "aliases"),
    ("tasktree: 1\nname: x\nroot: {kind: Assert, attr_or_condition_func: __class__}\n", "3:46",
     "a spec reads and writes public fields only"),
])
def test_bad_documents_are_refused_naming_the_place(text: str, where: str, message: str) -> None:
    problems = validate(text, source="bad.yaml")
    assert problems, text
    shown = [str(p) for p in problems]
    assert any(s.startswith(where + ":") and message in s for s in shown), shown
    with pytest.raises(SpecError) as caught:
        Tree.from_spec(text, source="bad.yaml")
    assert f"bad.yaml:{where}: " in str(caught.value)


def test_too_deep_and_too_large_documents_are_refused() -> None:
    deep: dict = {"kind": "TODO"}
    for _ in range(70):
        deep = {"kind": "Invert", "children": [deep]}
    with pytest.raises(SpecError, match="levels"):
        Tree.from_spec({"tasktree": 1, "name": "deep", "root": deep})
    with pytest.raises(SpecError, match="levels"):
        Tree.from_spec(yaml.safe_dump({"tasktree": 1, "name": "deep", "root": deep}))
    with pytest.raises(SpecError, match="at most 1048576"):
        Tree.from_spec("tasktree: 1\nname: big\nroot: {kind: TODO}\n" + "#" * (1 << 20))
    with pytest.raises(SpecError, match="levels"):
        Tree.from_spec("[" * 100_000)


def test_to_spec_names_an_unregistered_callable_with_its_address() -> None:
    tree = Tree("spec_unregistered").Sequence()._().Function(lambda b: 1, name="anon").End()
    with pytest.raises(SpecError) as caught:
        tree.to_spec()
    assert "Function(anon) at spec_unregistered/Sequence/Function(anon): func: function 'lambda' is not registered" \
        in str(caught.value)


def test_a_json_pointer_is_given_for_dict_documents() -> None:
    problems = validate({"tasktree": 1, "name": "x", "root": {"kind": "Sequence", "children": [{"kind": "Nope"}]}})
    assert [p.where() for p in problems] == ["/root/children/0/kind"]


def test_a_schema_never_makes_the_process_fetch_a_remote_ref() -> None:
    import http.server
    import threading

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = f"http://127.0.0.1:{server.server_address[1]}/schema.json"
        text = f"tasktree: 1\nname: x\nblackboard: {{$ref: '{remote}'}}\nroot: {{kind: TODO}}\n"
        problems = [str(p) for p in validate(text)]
        assert problems == [f"3:20: blackboard is not a valid JSON Schema: $ref {remote} cannot be resolved: a "
                            "schema here is self-contained (no remote references)"]
        from tasktree_dist.runs.blackboards import check_blackboard
        from tasktree_dist.runs.model import SubmitError

        with pytest.raises(SubmitError, match="no remote references"):
            check_blackboard({"type": "object", "properties": {"a": {"$ref": remote}}}, {"a": 1}, "t")
    finally:
        server.shutdown()
        thread.join(5)
    assert hits == []


def test_tasktree_validate_and_schema_offline(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from tasktree_dist.cli import cli

    monkeypatch.setenv("TASKTREE_IMPORTS", "tests.spec_trees")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(every_kind_tree().to_spec()))
    bad.write_text("tasktree: 1\nname: bad\nroot:\n  kind: Retry\n  max_tries: 0\n  children: []\n")
    runner = CliRunner()
    done = runner.invoke(cli, ["validate", str(good)])
    assert done.exit_code == 0, done.output
    done = runner.invoke(cli, ["validate", str(good), str(bad)])
    assert done.exit_code == 2
    assert f"{bad}:5:14: max_tries: 0 is less than the minimum of 1" in done.output
    assert f"{bad}:6:13: Retry needs exactly 1 child node(s), has 0" in done.output
    done = runner.invoke(cli, ["schema"])
    assert done.exit_code == 0 and json.loads(done.output)["$defs"]["Retry"]["required"] == ["kind", "max_tries",
                                                                                           "children"]
