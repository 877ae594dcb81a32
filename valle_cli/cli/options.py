"""What every verb shares: the stderr console, verbosity, common options, progress bars.

Only ``valle_cli.cli`` knows about typer, rich, argv and exit codes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

# stdout carries only data products; everything a human reads goes to stderr.
console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


class Log:
    """Verbosity-aware messages on stderr: -q silences info and progress, -v adds detail."""

    level = 1  # 0 quiet, 1 normal, 2+ verbose

    @classmethod
    def configure(cls, quiet: bool, verbose: int) -> None:
        cls.level = 0 if quiet else 1 + verbose

    @classmethod
    def info(cls, msg: str) -> None:
        if cls.level >= 1:
            console.print(msg, markup=False, soft_wrap=True)

    @classmethod
    def detail(cls, msg: str) -> None:
        if cls.level >= 2:
            console.print(msg, markup=False, style="dim", soft_wrap=True)

    @classmethod
    def warn(cls, msg: str) -> None:
        # Warnings survive -q: they tell the user something about their data.
        console.print(f"Warning: {msg}", markup=False, style="yellow", soft_wrap=True)


@contextmanager
def progress(description: str, total: float | None, unit: str = "") -> Iterator[callable]:
    """A rich progress bar on stderr (only on a TTY and when not quiet); yields advance(n)."""
    if Log.level == 0 or not console.is_terminal:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if unit:
        columns.append(TextColumn("{task.fields[rate]}"))
    columns.append(TimeRemainingColumn())
    import time

    start = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: float = 1) -> None:
            done = bar.tasks[0].completed + n
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.1f} {unit}/s" if unit else "")

        yield advance


def stdin_is_terminal() -> bool:
    return sys.stdin is None or sys.stdin.isatty()


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr.")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr (repeatable).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed every random generator (deterministic run).")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo outputs that already exist (default: skip them).")]
