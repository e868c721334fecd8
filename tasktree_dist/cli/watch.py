"""Following a run's event stream in a terminal: a progress bar per fan-out, a line per state change and failed
unit; or JSON lines for scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from ..core.progress import ProgressEvent, rich_progress
from ..runs.model import RunEvent
from .render import event_json, event_line

if TYPE_CHECKING:
    from ..runs.client import RunClient


def progress_event(event: RunEvent) -> ProgressEvent | None:
    data = event.data
    try:
        return ProgressEvent(str(data["node"]), int(data.get("run", 0)), int(data["done"]), int(data["total"]),
                             int(data.get("failed", 0)), float(data.get("elapsed_s", 0.0)))
    except (KeyError, TypeError, ValueError):
        return None


async def follow_events(
    client: RunClient, run_id: str, out: Console, *, follow: bool = True, from_id: str = "0", as_json: bool = False,
    every_unit: bool = False,
) -> None:
    """Print the run's events from `from_id`; with `follow`, until the run finishes."""
    if as_json:
        async for event in client.aevents(run_id, from_id, follow):
            print(event_json(event), flush=True)
        return
    with rich_progress(min_children=1, console=out, transient=False) as show:
        async for event in client.aevents(run_id, from_id, follow):
            if event.type == "progress":
                progress = progress_event(event)
                if progress is not None:
                    show(progress)
                continue
            line = event_line(event, every_unit)
            if line is not None:
                out.print(line)
