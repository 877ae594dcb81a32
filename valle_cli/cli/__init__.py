"""The ``valle`` command: one module per verb, each a thin typed shell over a library function.

``main`` maps failures to the CLI contract: exit 0 success, 1 runtime failure with one
``Error: ...`` line (full traceback with VALLE_DEBUG=1), 2 usage error, 130 on Ctrl-C, and a
quiet exit when the reader of stdout goes away (``| head``).
"""

from __future__ import annotations

import errno
import os
import sys

import typer

from valle_cli import __version__
from valle_cli.cli import decode, evaluate, phonemize, quantize, sample, score_chunks, shard, similarity, train
from valle_cli.cli.options import click_errors, suggest_closest, uppercase_placeholders

app = typer.Typer(
    name="valle",
    help="Neural-codec language models of audio, as small shell stages.\n\n"
    "Example: valle quantize audio/ -o codes/ && valle decode codes/ -o resynth/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"valle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


for module in (phonemize, quantize, score_chunks, shard, train, sample, decode, similarity, evaluate):
    module.register(app)


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)
INTERRUPTED_LINE = "Interrupted."


def _one_line(exc: BaseException) -> str:
    from valle_cli.errors import ValleError

    if isinstance(exc, ValleError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"{where}no space left on device (nothing partial was kept)"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{where}cannot write here: {exc.strerror}"
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch-seconds or --device cpu)"
    return f"{type(exc).__name__}: {exc} (set VALLE_DEBUG=1 for the traceback)"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn every outcome into the right exit code."""
    command = typer.main.get_command(app)
    uppercase_placeholders(command)
    debug = bool(os.environ.get("VALLE_DEBUG"))
    try:
        # With standalone_mode=False typer *returns* an exit code instead of raising: the code of a
        # typer.Exit raised inside a verb, and 130 for a KeyboardInterrupt it caught itself (no verb
        # returns a number of its own, so a returned 130 is Ctrl-C).
        returned = command.main(args=argv, prog_name="valle", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
        if code == INTERRUPTED:
            print(INTERRUPTED_LINE, file=sys.stderr)
    except typer.Exit as e:
        code = e.exit_code
    except click_errors.NoSuchOption as e:
        suggest_closest(e).show()
        code = 2
    except click_errors.UsageError as e:  # includes BadParameter, MissingParameter
        e.show()
        code = 2
    except click_errors.ClickException as e:
        e.show()
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print(INTERRUPTED_LINE, file=sys.stderr)
        code = INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout has gone (`valle ... | head`): exit quietly, and keep Python from
        # complaining again when it flushes stdout at shutdown.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except Exception as e:  # noqa: BLE001 - the contract: one line, unless debugging
        if debug:
            raise
        from valle_cli.errors import PartialFailure

        if isinstance(e, PartialFailure):  # the good items were written; list the bad ones first
            for item, reason in e.failures.items():
                print(f"  {item}: {reason}", file=sys.stderr)
        print(f"Error: {_one_line(e)}", file=sys.stderr)
        code = 1
    sys.exit(code)
