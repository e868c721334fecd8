"""`tasktree validate`, `tasktree schema` and `tasktree run`: specs checked offline or against the live fleet's
palette, the spec format's JSON Schema, and a spec (a tree or an agent) run in this process."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from . import render
from .inputs import InputError, import_modules, parse_vars, read_json, read_spec
from .main import EXIT_INPUT, EXIT_OK, EXIT_RUN_FAILED, Config, cli, errors, pass_config


def fleet_palette(config: Config) -> dict[str, Any]:
    from ..builder.spec_palette import merge_palettes
    from .fleet import FleetReader

    processes = FleetReader(config.settings).processes()
    if not processes:
        raise InputError("no live fleet process: start workers (celery -A worker worker) or leave out --fleet")
    return merge_palettes([info.get("palette") or {} for info in processes])


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="A $NAME's value (repeatable).")
@click.option("--fleet", is_flag=True, help="Check names against the live fleet's palette (not this process's).")
@click.option("-i", "--import", "imports", multiple=True, metavar="MODULE",
              help="Module registering functions/tools/trees (repeatable; default: TASKTREE_IMPORTS).")
@pass_config
def validate(config: Config, files: tuple[str, ...], variables: tuple[str, ...], fleet: bool,
             imports: tuple[str, ...]) -> None:
    """Check spec documents: exit 0, or exit 2 with `FILE:line:col: message` for each problem."""
    from ..builder.spec import validate as check

    with errors(config.settings):
        values = parse_vars(variables)
        palette = fleet_palette(config) if fleet else None
        if not fleet:
            for note in import_modules(list(imports) or config.settings.import_list, explicit=bool(imports)):
                click.echo(f"warning: {note}", err=True)
        texts = {path: read_spec(path) for path in files}
    failed = False
    for path, text in texts.items():
        for problem in check(text, values, source=path, palette=palette):
            failed = True
            click.echo(f"{path}:{problem.where()}: {problem.message}", err=True)
    if not failed:
        click.echo(f"{len(files)} spec(s) valid")
    sys.exit(EXIT_INPUT if failed else EXIT_OK)


@cli.command()
@click.option("--fleet", is_flag=True, help="The live fleet's palette instead: every registered function, tool, "
                                            "store, type and tree with its schemas.")
@pass_config
def schema(config: Config, fleet: bool) -> None:
    """The JSON Schema of spec documents (for editors), or with --fleet the palette specs may use."""
    from ..builder.spec_schema import spec_schema

    with errors(config.settings):
        click.echo(render.to_json(fleet_palette(config) if fleet else spec_schema()))


@cli.command("run")
@click.argument("file", metavar="FILE")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="A $NAME's value (repeatable).")
@click.option("-b", "--blackboard", default=None, metavar="JSON|@FILE|-", help="The initial blackboard (JSON).")
@click.option("-i", "--import", "imports", multiple=True, metavar="MODULE",
              help="Module registering functions/tools/trees (repeatable; default: TASKTREE_IMPORTS).")
@click.option("--trace", "show_trace", is_flag=True, help="Print the run's trace tree to stderr.")
def run_spec(file: str, variables: tuple[str, ...], blackboard: str | None, imports: tuple[str, ...],
             show_trace: bool) -> None:
    """Run a spec (a tree or an agent) in this process; prints the result data as JSON, exit 1 if it failed."""
    from ..builder.spec_source import SpecError
    from ..builder.tree import Tree
    from ..core.context import Context
    from ..core.settings import TasktreeSettings
    from ..runs.blackboards import check_blackboard, typed_blackboard

    settings = TasktreeSettings()
    try:
        for note in import_modules(list(imports) or settings.import_list, explicit=bool(imports)):
            click.echo(f"warning: {note}", err=True)
        values = parse_vars(variables)
        board = read_json(blackboard, "--blackboard") if blackboard is not None else None
        tree = Tree.from_spec(read_spec(file), values, source=file)
        from ..builder.spec_palette import blackboard_schema

        if board is None and getattr(tree, "agent", None) is not None:
            board = {}
        check_blackboard(blackboard_schema(tree), board, tree.name)
        board = typed_blackboard(tree, board)
    except SpecError as exc:
        for problem in exc.problems:
            click.echo(f"{file}:{problem.where()}: {problem.message}", err=True)
        sys.exit(EXIT_INPUT)
    except (InputError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_INPUT)

    async def main() -> Any:
        context = Context()
        async with context.using_blackboard(board):
            result = await tree(context)
        return result, context

    result, context = asyncio.run(main())
    if show_trace:
        render.console(stderr=True).print(render.trace_tree(context.trace_root().json(), 8))
    click.echo(render.to_json(result.data))
    sys.exit(EXIT_OK if result.is_ok() else EXIT_RUN_FAILED)
