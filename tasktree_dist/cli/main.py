"""The `tasktree` command (click). Each command is a thin layer over RunClient; `errors()` turns what can go
wrong into a message naming it and the documented exit code (see the package docstring)."""

from __future__ import annotations

import asyncio
import functools
import getpass
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click
from kombu.utils.url import maybe_sanitize_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..builder.spec_source import SpecError
from ..core.errors import SignalError
from ..core.settings import TasktreeSettings
from ..runs.model import RunNotFoundError, RunQueryError, RunState, RunStateError, RunStatus, SubmitError
from . import render
from .inputs import (
    InputError,
    blackboard_for,
    import_modules,
    is_spec_file,
    parse_labels,
    parse_vars,
    read_json,
    read_spec,
    spec_document,
)
from .watch import follow_events

if TYPE_CHECKING:
    from ..runs.client import RunClient

T = TypeVar("T")

EXIT_OK, EXIT_RUN_FAILED, EXIT_INPUT, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class Config:
    """Settings from TASKTREE_* with the command line's overrides; one RunClient per command."""

    def __init__(self, redis_url: str | None, broker_url: str | None) -> None:
        overrides = {k: v for k, v in (("redis_url", redis_url), ("broker_url", broker_url)) if v}
        self.settings = TasktreeSettings(**overrides)

    def client(self) -> RunClient:
        """Imported here: Celery costs a third of a second that commands failing on their input do not pay."""
        from ..distributed.app import create_app
        from ..runs.client import RunClient

        # actions taken straight on Redis go to the audit under the operator's login on this host
        return RunClient(create_app(self.settings), settings=self.settings, audit_as=f"cli:{getpass.getuser()}")


def fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def errors(settings: TasktreeSettings) -> Iterator[None]:
    try:
        yield
    except (RunNotFoundError, SubmitError, RunStateError, RunQueryError, InputError, SignalError, SpecError) as exc:
        fail(str(exc), EXIT_INPUT)
    except TimeoutError as exc:
        fail(f"{exc} (still going; ask again later)", EXIT_TIMEOUT)
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        fail(f"cannot reach Redis at {maybe_sanitize_url(settings.redis_url)} (TASKTREE_REDIS_URL / --redis-url): "
             f"{exc}", EXIT_UNREACHABLE)


def run_async(config: Config, work: Callable[[RunClient], Coroutine[Any, Any, T]]) -> T:
    """Run `work(client)` on a fresh event loop, the client closed after it, errors mapped to exit codes."""
    async def main() -> T:
        client = config.client()
        try:
            return await work(client)
        finally:
            await client.aclose()

    with errors(config.settings):
        return asyncio.run(main())
    raise AssertionError("unreachable")  # errors() exits


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")(command)


def pass_config(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return command(click.get_current_context().find_object(Config), *args, **kwargs)
    return wrapper


def server_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--server", envvar="TASKTREE_SERVER", default=None, metavar="URL",
        help="Ask this `tasktree serve` (with the token in TASKTREE_API_TOKEN) instead of Redis.")(command)


def remote(config: Config, server: str, method: str, path: str) -> dict[str, Any]:
    """`method path` on --server with TASKTREE_API_TOKEN; a refusal exits 2 (1 for a 409 conflict), naming it."""
    from .remote import RemoteError, api_request

    try:
        return api_request(server, method, path, config.settings.api_token)
    except RemoteError as exc:
        fail(str(exc), EXIT_RUN_FAILED if exc.status == 409 else EXIT_UNREACHABLE if exc.status is None
             else EXIT_INPUT)
    raise AssertionError("unreachable")  # fail() exits


def finished_code(status: RunStatus) -> int:
    return EXIT_OK if status.state is RunState.SUCCEEDED else EXIT_RUN_FAILED


class OneLineErrors(click.Group):
    """Click's usage errors as one line (`error: ...`, exit 2) like every other input error of the command, not
    click's usage block: scripts read one line on stderr whatever was wrong."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # `tasktree` alone: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            fail(f"{exc.format_message()}{where}", exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--redis-url", envvar="TASKTREE_REDIS_URL", help="Redis of runs (default: TASKTREE_REDIS_URL).")
@click.option("--broker-url", envvar="TASKTREE_BROKER_URL", help="Celery broker (default: TASKTREE_BROKER_URL).")
@click.version_option(package_name="tasktree_dist")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, broker_url: str | None) -> None:
    """Operate a tasktree_dist fleet: submit and watch runs, cancel and retry them, read traces, serve the runs
    board and metrics. Settings come from TASKTREE_* (as the workers read them)."""
    ctx.obj = Config(redis_url, broker_url)


# -- runs -------------------------------------------------------------------------------------------------------------
@cli.command()
@click.argument("tree")
@click.option("-b", "--blackboard", default=None, metavar="JSON|@FILE|-",
              help="The initial blackboard as JSON, @file or - (stdin); decoded into the tree's blackboard type.")
@click.option("-i", "--import", "imports", multiple=True, metavar="MODULE",
              help="Module that builds the tree (repeatable; default: TASKTREE_IMPORTS).")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label (repeatable).")
@click.option("--run-id", default=None, help="Idempotency key: an existing run with this id is returned instead.")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="A spec's $NAME value (repeatable).")
@click.option("--wait", is_flag=True, help="Follow the run until it finishes; exit 1 unless it succeeded.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up waiting after SECONDS (exit 3).")
@json_option
@pass_config
def submit(config: Config, tree: str, blackboard: str | None, imports: tuple[str, ...], labels: tuple[str, ...],
           run_id: str | None, variables: tuple[str, ...], wait: bool, timeout: float | None, as_json: bool) -> None:
    """Submit a run of TREE (a registered tree's name, or a spec file: .yaml/.yml/.json); prints the run id (or its
    status with --json)."""
    target: Any = tree
    with errors(config.settings):
        data = read_json(blackboard, "--blackboard") if blackboard is not None else None
        label_map = parse_labels(labels)
        values = parse_vars(variables)
        problems, warning, board = [], None, data
        if is_spec_file(tree):
            target = spec_document(tree, read_spec(tree))
        else:
            problems = import_modules(list(imports) or config.settings.import_list, explicit=bool(imports))
            board, warning = blackboard_for(tree, data)
    for note in [*problems, *([warning] if warning else [])]:
        click.echo(f"warning: {note}", err=True)

    async def work(client: RunClient) -> int:
        run = await client.asubmit(target, board, run_id=run_id, labels=label_map, variables=values)
        if not wait:
            click.echo((await run.astatus()).model_dump_json() if as_json else run.id)
            return EXIT_OK
        click.echo(f"run {run.id}", err=True)
        await asyncio.wait_for(follow_events(client, run.id, render.console(stderr=True)), timeout)
        status = await run.astatus()
        click.echo(status.model_dump_json() if as_json else run.id)
        if not as_json:
            render.console(stderr=True).print(render.status_table(status))
        return finished_code(status)

    sys.exit(run_async(config, work))


@cli.command()
@click.argument("run_id", metavar="RUN")
@json_option
@pass_config
def status(config: Config, run_id: str, as_json: bool) -> None:
    """A run's state, progress, timing, tokens, cost and error (--json: RunStatus JSON)."""
    found = run_async(config, lambda client: client.astatus(run_id))
    if as_json:
        click.echo(found.model_dump_json())
    else:
        render.console().print(render.status_table(found))


@cli.command()
@click.option("--state", type=click.Choice([s.value for s in RunState]), default=None, help="Only runs in STATE.")
@click.option("--tree", default=None, help="Only runs of TREE.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--cursor", default=None, help="Continue a listing (the cursor a previous --json page gave).")
@json_option
@pass_config
def runs(config: Config, state: str | None, tree: str | None, limit: int, cursor: str | None, as_json: bool) -> None:
    """Runs, newest first."""
    page = run_async(config, lambda client: client.alist(state, tree, limit, cursor))
    if as_json:
        click.echo(render.to_json({"runs": [r.model_dump(mode="json") for r in page], "cursor": page.cursor}))
        return
    out = render.console()
    out.print(render.runs_table(page) if page else "no runs")
    if page.cursor:
        out.print(f"more: tasktree runs --cursor {page.cursor}", style="dim")


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--timeout", type=float, default=0.0, show_default=True,
              help="Wait up to SECONDS for the run to finish (exit 3 if it has not).")
@json_option
@pass_config
def result(config: Config, run_id: str, timeout: float, as_json: bool) -> None:
    """The run's result data as JSON; exit 1 when the run failed or was cancelled."""
    async def work(client: RunClient) -> tuple[Any, RunStatus]:
        outcome = await client.aresult(run_id, timeout=timeout)
        return outcome, await client.astatus(run_id)

    outcome, found = run_async(config, work)
    if as_json:
        click.echo(render.to_json({"state": found.state.value, "status": outcome.status.value,
                                   "data": outcome.data, "error": found.error}))
    else:
        click.echo(render.to_json(outcome.data))
    if found.state is not RunState.SUCCEEDED and found.error is not None:
        click.echo(f"run {run_id} {found.state.value}: {found.error.message}", err=True)
    sys.exit(finished_code(found))


@cli.command()
@click.argument("run_id", metavar="RUN")
@server_option
@pass_config
def cancel(config: Config, run_id: str, server: str | None) -> None:
    """Cancel a queued or running run (its units stop within a second); exit 1 if it had already finished."""
    if server:
        remote(config, server, "POST", f"/api/runs/{run_id}/cancel")
        click.echo(f"run {run_id} cancelled")
        return

    async def work(client: RunClient) -> tuple[bool, RunStatus]:
        return await client.acancel(run_id), await client.astatus(run_id)

    cancelled, found = run_async(config, work)
    if cancelled:
        click.echo(f"run {run_id} cancelled")
        return
    click.echo(f"run {run_id} had already finished ({found.state.value}); nothing cancelled", err=True)
    sys.exit(EXIT_RUN_FAILED)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("name")
@click.option("-d", "--data", default="null", show_default=True, metavar="JSON|@FILE|-",
              help="The payload: JSON inline, @path to a JSON file, or - for standard input.")
@click.option("--id", "signal_id", default=None, help="Signal id: the same id twice is recorded once.")
@click.option("-i", "--import", "imports", multiple=True, metavar="MODULE",
              help="Module that builds the run's tree, to check a signal sent before its wait is reached "
                   "(repeatable; default: TASKTREE_IMPORTS).")
@pass_config
def signal(config: Config, run_id: str, name: str, data: str, signal_id: str | None,
           imports: tuple[str, ...]) -> None:
    """Answer the run's wait NAME (or keep the signal until the wait is reached); a parked run resumes.
    Exit 2 when the payload does not fit the wait's schema (the field is named), the run or name is unknown, or
    the run has finished."""
    with errors(config.settings):
        payload = read_json(data, "--data")
        import_modules(list(imports) or config.settings.import_list, explicit=bool(imports))

    async def work(client: RunClient) -> bool:
        return await client.asignal(run_id, name, payload, signal_id)

    if run_async(config, work):
        click.echo(f"run {run_id}: signal {name!r} recorded")
    else:
        click.echo(f"run {run_id}: signal id {signal_id!r} was recorded before; nothing changed", err=True)


@cli.command()
@click.argument("run_id", metavar="RUN", required=False)
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Without RUN: how many waiting runs to list.")
@json_option
@pass_config
def waits(config: Config, run_id: str | None, limit: int, as_json: bool) -> None:
    """Pending waits of RUN (name, node, prompt, payload schema, since, deadline); without RUN, of every waiting
    run (newest first)."""
    async def work(client: RunClient) -> list[tuple[str, list[Any]]]:
        ids = [run_id] if run_id else [status.id for status in await client.alist(RunState.WAITING, limit=limit)]
        return [(found, await client.awaits(found)) for found in ids]

    found = run_async(config, work)
    if as_json:
        click.echo(render.to_json({run: [wait.json() for wait in pending] for run, pending in found}))
        return
    out = render.console()
    if not found:
        out.print("no waiting runs")
    for run, pending in found:
        out.print(f"run {run}: {len(pending)} pending wait(s)")
        if pending:
            out.print(render.waits_table(pending))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--wait", is_flag=True, help="Follow the run until it finishes; exit 1 unless it succeeded.")
@server_option
@pass_config
def retry(config: Config, run_id: str, wait: bool, server: str | None) -> None:
    """Run a failed or cancelled run again under its id (finished units are reused, not paid again)."""
    if server:
        if wait:
            fail("--wait reads the run's events from Redis: not with --server", EXIT_INPUT)
        remote(config, server, "POST", f"/api/runs/{run_id}/retry")
        click.echo(f"run {run_id} queued again")
        return

    async def work(client: RunClient) -> int:
        seen = await client.aevents_after(run_id, "0", count=100_000)
        await client.aretry(run_id)
        click.echo(f"run {run_id} queued again")
        if not wait:
            return EXIT_OK
        await follow_events(client, run_id, render.console(stderr=True), from_id=seen[-1].id if seen else "0")
        return finished_code(await client.astatus(run_id))

    sys.exit(run_async(config, work))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep reading until the run finishes.")
@click.option("--from", "from_id", default="0", show_default=True, help="Stream id to read after (0: the start).")
@click.option("--units", "every_unit", is_flag=True, help="A line per finished unit, not only failed ones.")
@json_option
@pass_config
def events(config: Config, run_id: str, follow: bool, from_id: str, every_unit: bool, as_json: bool) -> None:
    """The run's events: a progress bar per fan-out, state changes and failed units (--json: JSON lines)."""
    async def work(client: RunClient) -> None:
        await client.astatus(run_id)  # an unknown run is an error, not an empty stream
        await follow_events(client, run_id, render.console(), follow=follow, from_id=from_id, as_json=as_json,
                            every_unit=every_unit)

    run_async(config, work)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--save", "save_dir", default=None, metavar="DIR",
              help="Save it as a trace file (the trace server's format) in DIR; prints the trace id.")
@click.option("--depth", type=click.IntRange(1, 100), default=6, show_default=True, help="Levels shown.")
@json_option
@pass_config
def trace(config: Config, run_id: str, save_dir: str | None, depth: int, as_json: bool) -> None:
    """The run's merged trace (every worker's part), as written so far. Saved and --json traces include the
    children of large fan-outs that the coordinator kept only in unit records."""
    async def work(client: RunClient) -> dict[str, Any]:
        await client.astatus(run_id)
        found = await client.atrace(run_id, full=save_dir is not None or as_json)
        if found is None:
            raise RunStateError(f"run {run_id} has no trace yet (its coordinator writes one within a second of "
                                "starting)")
        return found

    found = run_async(config, work)
    if save_dir is not None:
        from ..tracing.storage import FileTraceStorageHandler

        click.echo(asyncio.run(FileTraceStorageHandler(save_dir).save(found)))
    elif as_json:
        click.echo(render.to_json(found))
    else:
        render.console().print(render.trace_tree(found, depth))


# -- fleet ------------------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (keep it local; another address needs tokens or --insecure-open).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--trace-dir", default=".traces", show_default=True, help="Saved traces to serve beside the runs.")
@click.option("--control-token", envvar="TASKTREE_CONTROL_TOKEN", default=None,
              help="A token with every scope, named `control` (env TASKTREE_CONTROL_TOKEN).")
@click.option("--tokens-file", envvar="TASKTREE_TOKENS_FILE", default=None, metavar="FILE",
              help="JSON list of scoped tokens (as TASKTREE_API_TOKENS; see docs/security.md).")
@click.option("--insecure-open", is_flag=True,
              help="Serve a non-loopback address without tokens: anyone reaching it reads every run.")
@pass_config
def serve(config: Config, host: str, port: int, trace_dir: str, control_token: str | None, tokens_file: str | None,
          insecure_open: bool) -> None:
    """The runs board, live run pages and the trace viewer, with their JSON API. With tokens configured every route
    but /api/health needs one (Authorization: Bearer)."""
    from ..web.server import InsecureServerError, run_server
    from ..web.tokens import TokenConfigError, TokenSet

    settings = config.settings
    try:
        tokens = TokenSet.configured(settings.api_tokens, tokens_file or settings.tokens_file,
                                     control_token or settings.control_token)
    except TokenConfigError as exc:
        fail(str(exc), EXIT_INPUT)
    with errors(settings):
        try:
            run_server(config.client(), host=host, port=port, trace_dir=trace_dir, tokens=tokens,
                       insecure_open=insecure_open)
        except InsecureServerError as exc:
            fail(str(exc), EXIT_INPUT)


@cli.command()
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--run", "run_id", default=None, help="Only entries about RUN.")
@server_option
@json_option
@pass_config
def audit(config: Config, limit: int, run_id: str | None, server: str | None, as_json: bool) -> None:
    """Who did what, newest first: submits, signals, cancels, retries and refused attempts (the fleet-wide audit
    stream in TASKTREE_REDIS_URL, or a server's /api/audit with an admin token)."""
    from urllib.parse import urlencode

    from ..runs.audit import AuditEntry, AuditLog

    if server:
        query = urlencode({"limit": limit, **({"run": run_id} if run_id else {})})
        found = remote(config, server, "GET", f"/api/audit?{query}")["entries"]
        entries = [AuditEntry(**{k: v for k, v in entry.items() if k != "time"}) for entry in found]
    else:
        with errors(config.settings):
            log = AuditLog.from_settings(config.settings)
            try:
                entries = log.entries(limit, run_id)
            finally:
                log.close()
    if as_json:
        click.echo(render.to_json([entry.to_json() for entry in entries]))
        return
    table = render.Table(header_style="bold")
    for column in ("time", "who", "action", "outcome", "run", "from", "detail"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.time.strftime("%Y-%m-%d %H:%M:%S"), entry.who, entry.action, entry.outcome,
                      entry.run or "", entry.address or "", entry.detail or "")
    render.console().print(table if entries else "no audit entries")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=9200, show_default=True)
@click.option("--targets", is_flag=True, help="Print the live processes' metrics endpoints (Prometheus file_sd "
                                               "JSON) and exit.")
@pass_config
def metrics(config: Config, host: str, port: int, targets: bool) -> None:
    """Fleet-wide metrics (runs by state, live processes, queue lengths) for Prometheus; each worker serves its
    own on TASKTREE_METRICS_PORT."""
    from .fleet import FleetReader, serve_fleet_metrics

    reader = FleetReader(config.settings)
    with errors(config.settings):
        if targets:
            click.echo(render.to_json(reader.scrape_targets()))
            return
        serve_fleet_metrics(reader, host, port)


@cli.command()
@json_option
@pass_config
def workers(config: Config, as_json: bool) -> None:
    """Live fleet processes (from their heartbeats): host, role, queues, units running and waiting for a fan-out
    slot, metrics endpoint."""
    from .fleet import FleetReader

    with errors(config.settings):
        processes = FleetReader(config.settings).processes()
    if as_json:
        click.echo(render.to_json(processes))
        return
    table = render.Table(header_style="bold")
    for column in ("process", "host", "role", "queues", "running", "waiting", "metrics", "trees"):
        table.add_column(column)
    for info in processes:
        trees = sorted(info.get("trees") or {})
        shown = ", ".join(trees[:5]) + (f" +{len(trees) - 5}" if len(trees) > 5 else "")
        if not trees and info.get("role") == "worker":
            shown = "[bold red]NONE registered: set TASKTREE_IMPORTS[/]"  # it hands every unit back
        table.add_row(str(info.get("process")), str(info.get("host", "")), str(info.get("role", "")),
                      ",".join(info.get("queues") or []), str(info.get("running", "")),
                      str(info.get("waiting_for_slot", "")), str(info.get("metrics") or "–"), shown)
    render.console().print(table if processes else "no live processes")


def main() -> None:
    cli(prog_name="tasktree")
