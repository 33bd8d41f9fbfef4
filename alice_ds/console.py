"""Shared console helpers: one rich Console, progress bars, summary tables (rank-0 friendly)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

LOG_WIDTH = 120
"""Columns when stderr is a file or pipe (a cluster job's log) and COLUMNS is unset: rich's 80 cut
lines such as the trainer's start-up summary in two."""
console = Console(stderr=True, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else LOG_WIDTH)
"""Progress and tables go to stderr so that stdout stays machine-readable (`--json` output)."""


class RateColumn(ProgressColumn):
    """Items per second over rich's recent window, e.g. `0.42 cases/s` (blank until measured)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.2f} {self.unit}/s", style="progress.data.speed")


def progress(disable: bool = False, transient: bool = False, unit: str | None = None) -> Progress:
    """A progress bar with counts, elapsed time and ETA (and the rate in `unit`s per second when
    given). Disabled when ALICE_DS_PROGRESS=0 is set, so CI logs stay short."""
    if os.environ.get("ALICE_DS_PROGRESS", "1") == "0":
        disable = True
    rate = [RateColumn(unit)] if unit else []
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), *rate, TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=disable, transient=transient)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    """A rich table of already-formatted rows; print it with `console.print(table(...))`."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}")


def fail(msg: str) -> None:
    """Print a one-line error for a user mistake (no traceback)."""
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    sys.stderr.flush()
