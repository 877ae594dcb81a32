"""valle similarity: speaker similarity (cosine of speaker embeddings) of pairs of audio or codes files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Verbose, progress, skip_existing

HELP = """Example: valle similarity prompt.wav generated.wav

Speaker similarity of pairs of utterances: the cosine of their speaker embeddings (1 = same direction).

Pairs come from two files; from two folders, paired by relative path without extension (files found
in one folder only are counted and listed, not compared); or from --pairs TABLE, rows "a|b", "a,b"
or tab-separated, an optional header "a,b", paths relative to the table. --matrix FOLDER compares
every file of a folder with every other; when the files sit in speaker subfolders (spk/utt.wav) it
also reports the mean same-speaker and different-speaker similarity and the equal-error rate (EER)
of a same/different threshold. Files are audio or codes (.npz, decoded with the codec they record).

Encoders: ge2e (default) is resemblyzer's GE2E voice encoder, whose weights ship in its wheel
(offline; pip install --no-deps resemblyzer webrtcvad-wheels); mfcc needs no model (MFCC
statistics: a baseline); codes uses a trained valle checkpoint (--checkpoint): its prompt
embeddings summed over codebook levels and averaged over time.

The table (a, b, similarity, encoder; --matrix adds same_speaker) goes to stdout as CSV, or to -o
FILE as .csv, .parquet or .json. A summary (pairs, mean, std, min, max) goes to stderr.

Audio that has no voice to embed is refused, never scored: under 50 ms, digital silence, or stereo
that cancels once mixed to mono. One such pair is an error (exit 1); among many, the other pairs are
written and the refused files are listed (exit 1).
"""


class EncoderName(str, Enum):
    ge2e = "ge2e"
    mfcc = "mfcc"
    codes = "codes"


_TABLE_EXTENSIONS = (".csv", ".parquet", ".json")
_LISTED = 5  # unmatched files named in the warning


def command(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Two files, or two folders to pair by name.",
                                                        metavar="A B")] = None,
    pairs: Annotated[Path | None, typer.Option("--pairs", help="Table of pairs (a|b, a,b or tab), or - for stdin.",
                                               allow_dash=True)] = None,
    matrix: Annotated[Path | None, typer.Option("--matrix", help="Folder: every file against every other.")] = None,
    encoder: Annotated[EncoderName, typer.Option("--encoder", "-e", help="Speaker embedding.")] = EncoderName.ge2e,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint or run folder (--encoder codes).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Table .csv, .parquet, .json, or - (CSV on stdout).",
                                      allow_dash=True)] = Path("-"),
    overwrite: Overwrite = False,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    inputs = inputs or []
    modes = sum([bool(inputs), pairs is not None, matrix is not None])
    if modes != 1:
        raise typer.BadParameter("give two files or folders, --pairs TABLE, or --matrix FOLDER (one of them)",
                                 param_hint="A B")
    if inputs and len(inputs) != 2:
        raise typer.BadParameter(f"expected two files or two folders, got {len(inputs)}", param_hint="A B")
    if encoder is EncoderName.codes and checkpoint is None:
        raise typer.BadParameter("--encoder codes needs --checkpoint run/", param_hint="--checkpoint")
    if encoder is not EncoderName.codes and checkpoint is not None:
        raise typer.BadParameter("only --encoder codes uses a checkpoint", param_hint="--checkpoint")
    to_stdout = str(out) == "-"
    if not to_stdout and out.suffix.lower() not in _TABLE_EXTENSIONS:
        raise typer.BadParameter(f"{out}: expected a .csv, .parquet or .json file, or - for stdout",
                                 param_hint="--out")
    from valle_cli.common import refuse_output_over_input

    refuse_output_over_input(out, [*inputs, pairs, matrix, checkpoint])
    if skip_existing(out, overwrite):
        return

    from valle_cli.evaluation import similarity as sim

    options: dict[str, Any] = {"checkpoint": checkpoint, "device": device}
    if matrix is not None:
        _run_matrix(matrix, encoder.value, out, options)
        return
    if pairs is not None:
        pair_list = sim.read_pairs(pairs)
    elif all(p.is_dir() for p in inputs):
        pair_list = _paired_folders(*inputs)
    else:
        for path in inputs:
            if path.is_dir():
                raise typer.BadParameter("give two files or two folders, not one of each", param_hint="A B")
        sim.check_files(inputs)
        pair_list = [(inputs[0], inputs[1])]
    files = [p for pair in pair_list for p in pair]
    refuse_output_over_input(out, files)
    # two files: an unusable one is the error; folders and tables: unusable files are listed, the rest written
    unusable: dict[str, str] | None = None if inputs and not inputs[0].is_dir() else {}
    with progress(f"embed ({encoder.value})", total=len(sim.distinct_files(files)), unit="files") as advance:
        df = sim.similarity_table(pair_list, encoder.value, on_progress=advance, unusable=unusable, **options)
    summary = sim.summarize(df["similarity"].to_numpy())
    sim.write_table(df, out, {"encoder": encoder.value, "mode": "pairs", "summary": summary}, unusable)
    Log.info(f"{_describe(summary, encoder.value)}{_destination(out)}")


def _paired_folders(a_dir: Path, b_dir: Path) -> list[tuple[Path, Path]]:
    """Pairs by relative path without extension; what one folder lacks is said, not skipped silently."""
    from valle_cli.evaluation import similarity as sim

    found = sim.pair_folders(a_dir, b_dir)
    for folder, other, alone in ((a_dir, b_dir, found.only_a), (b_dir, a_dir, found.only_b)):
        if alone:
            names = ", ".join(alone[:_LISTED]) + (", ..." if len(alone) > _LISTED else "")
            Log.warn(f"{len(alone)} file(s) of {folder} have no counterpart in {other}, not compared: {names}")
    Log.detail(f"{len(found.pairs)} pair(s) by name from {a_dir} and {b_dir}")
    return found.pairs


def _run_matrix(folder: Path, encoder: str, out: Path, options: dict[str, Any]) -> None:
    from valle_cli.evaluation import similarity as sim

    paths = sim.find_inputs(folder)
    speakers = sim.speakers_of(paths, folder)
    if speakers is None:
        Log.detail(f"{folder}: not every file is in a speaker subfolder: no same/different-speaker statistics")
    unusable: dict[str, str] = {}  # listed, the rest written
    with progress(f"embed ({encoder})", total=len(paths), unit="files") as advance:
        result = sim.matrix(paths, encoder, speakers=speakers, on_progress=advance, unusable=unusable, **options)
    meta = {"encoder": encoder, "mode": "matrix", "summary": result.summary, "same_speaker": result.same,
            "different_speaker": result.different, "eer": result.eer}
    sim.write_table(result.table, out, meta, unusable)
    Log.info(f"{len(paths)} files, {_describe(result.summary, encoder)}{_destination(out)}")
    if speakers is None:
        return
    n_speakers = len(set(speakers))
    line = f"{n_speakers} speaker(s): same speaker {_mean(result.same)}, different speakers {_mean(result.different)}"
    if result.eer is not None:
        line += f", EER {100 * result.eer:.1f} %"
    Log.info(line)


def _describe(summary: dict[str, float], encoder: str) -> str:
    if summary["n"] == 1:
        return f"1 pair, {encoder} similarity {summary['mean']:.3f}"
    return (f"{summary['n']} pair(s), {encoder} similarity: mean {summary['mean']:.3f}, std {summary['std']:.3f}, "
            f"min {summary['min']:.3f}, max {summary['max']:.3f}")


def _mean(summary: dict[str, float]) -> str:
    return f"{summary['mean']:.3f} ({summary['n']} pairs)" if summary["n"] else "- (no pairs)"


def _destination(out: Path) -> str:
    return "" if str(out) == "-" else f" -> {out}"


def register(app: typer.Typer) -> None:
    app.command("similarity", help=HELP, short_help="Speaker similarity of audio/codes pairs (ge2e, mfcc, codes).",
                no_args_is_help=True)(command)
