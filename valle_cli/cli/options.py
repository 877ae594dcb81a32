"""What every verb shares: the stderr console, verbosity, common options, progress bars.

Only ``valle_cli.cli`` knows about typer, rich, argv and exit codes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from rich.console import Console

try:  # typer >= 0.2x ships its own copy of click; older typers use click itself
    from typer._click import exceptions as click_errors
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors
    from click import get_current_context

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


def progress_shown() -> bool:
    """Whether progress bars are drawn: on a terminal, unless -q (or VALLE_NO_PROGRESS=1)."""
    return Log.level >= 1 and console.is_terminal and not os.environ.get("VALLE_NO_PROGRESS")


@contextmanager
def progress(description: str, total: float | None, unit: str = "") -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (only when ``progress_shown()``); yields ``advance(n=1, info="")``,
    ``info`` being a short text shown after the bar (e.g. the training loss)."""
    if not progress_shown():
        yield lambda n=1, info="": None
        return
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    count = TaskProgressColumn() if unit else MofNCompleteColumn()  # percent (with a rate in info), or n/N steps
    columns = [TextColumn("{task.description}"), BarColumn(), count, TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: float = 1, info: str = "") -> None:
            done = bar.tasks[0].completed + n
            if unit and not info:
                info = f"{done / max(time.perf_counter() - start, 1e-9):,.1f} {unit}/s"
            bar.update(task, advance=n, info=info)

        yield advance


def skip_existing(out: Path, overwrite: bool, redo: str = "redo") -> bool:
    """True, after saying so, when ``out`` exists and --overwrite is not given: the verb has nothing to do.

    Stdout (``-``) never exists, so a piped verb always runs.
    """
    if str(out) == "-" or overwrite or not out.exists():
        return False
    Log.info(f"{out} exists, skipping (--overwrite to {redo})")
    return True


def no_such_option(flag: str, also: Iterable[str] = ()) -> click_errors.NoSuchOption:
    """click's usage error for an unknown ``--flag`` met by a verb that reads extra flags itself
    (``valle sample``'s sampler flags); it suggests the closest of the verb's options and ``also``."""
    ctx = get_current_context()
    known = [o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    return click_errors.NoSuchOption(flag, possibilities=closest_options(flag, [*known, *also]), ctx=ctx)


def closest_options(flag: str, options: Iterable[str]) -> list[str]:
    """The options close to ``flag``, best first, compared without their leading dashes (with them,
    every pair of long options shares "--" and ``--bogus`` would suggest ``--out``)."""
    from difflib import get_close_matches

    by_name = {option.lstrip("-"): option for option in options}
    return [by_name[name] for name in get_close_matches(flag.lstrip("-"), list(by_name), n=3, cutoff=0.6)]


def suggest_closest(error: click_errors.NoSuchOption) -> click_errors.NoSuchOption:
    """click's "No such option: --promt Did you mean --prompt?", naming only the closest option
    (typer's copy of click lists every close match instead)."""
    candidates = list(error.possibilities or [])
    if error.ctx is not None:
        candidates += [o for p in error.ctx.command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    closest = closest_options(error.option_name, candidates)
    if closest:
        error.message = f"{error.message} Did you mean {closest[0]}?"
    error.possibilities = None
    return error


_PLACEHOLDERS = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", Path: "PATH"}


def placeholder(annotation: Any) -> str:
    """click's name for a value of this type: PATH, TEXT, INTEGER, FLOAT, or [a|b] for a choice."""
    if get_origin(annotation) is list:  # a repeatable option: the placeholder names one value
        (annotation,) = get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "[" + "|".join(str(member.value) for member in annotation) + "]"
    return _PLACEHOLDERS.get(annotation, "VALUE")


def uppercase_placeholders(command: Any) -> None:
    """Uppercase placeholders in every verb's help: PATH, TEXT, INTEGER, [a|b] after an option, the
    declared metavar (else the name) for an argument. typer >= 0.2x writes Python types instead
    (``<path>``, ``<list[Path]>``, ``<int range>``, ``{input}``); older typers write click's names."""
    for verb in (command, *getattr(command, "commands", {}).values()):
        for param in verb.params:
            descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.2x only
            if descriptor is None:
                continue
            if param.param_type_name == "argument":
                param.metavar = param.metavar or param.name.upper()
                param.display_type_rich = lambda ctx: None  # the metavar names it: no <path> after it
            elif param.metavar is None and not (param.is_flag or param.count):
                param.metavar = placeholder(descriptor.annotation)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr.")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr (repeatable).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed every random generator (deterministic run).")]
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device(device: str) -> str:
    if not _DEVICE.fullmatch(device):
        raise typer.BadParameter(f"{device!r}: expected auto, cpu, cuda or cuda:N")
    return device


Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N", callback=_check_device)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo outputs that already exist (default: skip them).")]
