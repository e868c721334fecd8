"""The manual's checks that need no subprocess: README size and links, every page in the nav, runnable examples
that compile, the generated settings table and the API reference's names."""

from __future__ import annotations

import importlib
import re

import yaml

import tasktree_dist
from tests.docs_hooks import ROOT, load_hook, runnable_examples

README = ROOT / "README.md"
DOCS = ROOT / "docs"


def nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml names Python objects (!!python/name:...) for SuperFences' mermaid fence: read them as text
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_readme_is_a_front_door_of_at_most_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to a page under docs/"


def test_readme_links_to_docs_pages_that_exist() -> None:
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    assert links, "README.md links to no docs page"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README.md links to missing pages: {missing}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = set(nav_pages(mkdocs_config()["nav"]))
    pages = {path.name for path in DOCS.glob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries with no page: {sorted(nav - pages)}"


def test_there_are_runnable_examples_and_each_compiles() -> None:
    examples = runnable_examples()
    sources = {example.source for example in examples}
    assert "README.md" in sources and len(examples) >= 5, sources
    for example in examples:
        compile(example.code, example.where, "exec")  # a SyntaxError names the file and line


def test_runnable_examples_have_distinct_file_names_per_source() -> None:
    seen: dict[tuple[str, str], str] = {}
    for example in runnable_examples():
        key = (example.source, example.filename)
        assert key not in seen, f"{example.where}: file name {example.filename} also used at {seen[key]}"
        seen[key] = example.where


def test_the_runnable_word_is_taken_out_of_info_strings_and_the_rest_kept() -> None:
    runnable = load_hook("runnable")
    text = (
        'Intro\n\n```python runnable title="a.py"\nprint(1)\n```\n\n'
        "```python runnable\nx = 2\n```\n\n```bash\nls\n```\n"
    )
    blocks = runnable.runnable_blocks(text, "page.md")
    expected = [(3, "a.py", "print(1)\n"), (7, "example_7.py", "x = 2\n")]
    assert [(b.line, b.filename, b.code) for b in blocks] == expected
    stripped = runnable.strip_runnable(text)
    assert "runnable" not in stripped
    assert '```python title="a.py"\nprint(1)\n```' in stripped and "```python\nx = 2\n```" in stripped
    assert "```bash\nls\n```" in stripped


def test_settings_table_lists_every_field_with_its_description() -> None:
    from broker_config import TasktreeSettings

    settings_table = load_hook("settings_table")
    page = settings_table.on_page_markdown((DOCS / "configuration.md").read_text())
    assert settings_table.MARKER not in page
    for name, field in TasktreeSettings.model_fields.items():
        assert field.description, f"settings field {name} has no description: the configuration page needs one"
        row = next((line for line in page.splitlines() if f"`TASKTREE_{name.upper()}`" in line), None)
        if field.validation_alias is None:
            assert row is not None, f"TASKTREE_{name.upper()} missing from the configuration page"
            assert " ".join(field.description.split())[:40] in row


def test_reference_names_resolve_and_cover_the_public_api() -> None:
    reference_rest = load_hook("reference_rest")
    page = (DOCS / "reference.md").read_text()
    for module_name, name in re.findall(r"^::: (tasktree_dist(?:\.\w+)*)\.(\w+)\s*$", page, re.MULTILINE):
        module = importlib.import_module(module_name)
        assert hasattr(module, name), f"reference.md documents {module_name}.{name}, which does not exist"
    rendered = reference_rest.on_page_markdown(page)
    assert set(tasktree_dist.__all__) <= set(reference_rest.DOCUMENTED.findall(rendered))


def test_code_map_lists_every_module_with_its_package() -> None:
    code_map = load_hook("code_map")
    rows = code_map.code_map_rows()
    modules = {f"{package}.{module}" if module else package for package, module, _ in rows}
    assert {"tasktree_dist", "tasktree_dist.core.context", "tasktree_dist.distributed", "worker"} <= modules
    on_disk = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "tasktree_dist").rglob("*.py")
    }
    assert on_disk <= modules, f"modules missing from the code map: {sorted(on_disk - modules)}"
    page = code_map.on_page_markdown((DOCS / "architecture.md").read_text())
    assert code_map.MARKER not in page and "| | `context` |" in page
