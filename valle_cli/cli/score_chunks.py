"""valle score-chunks: codes folder -> chunks.parquet (per-chunk features, novelty, stability, priority)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Verbose, progress, skip_existing

HELP = """Example: valle score-chunks codes/ -o chunks.parquet

Score every chunk of every source in a codes folder, for drawing training windows and prompts.

Each source's code frames are cut into chunks (--chunk-seconds, or --bpm and --beats-per-chunk;
round(seconds x frame rate) frames, the last chunk may be shorter). Features come from the
original audio when the manifest's source file exists, else from the codes decoded by their
codec: RMS (dB), spectral shape flux (cosine distance) and magnitude flux, z-scored per source.
novelty: a fast vs a slow moving average of the features (or --novelty velocity|activity);
stability: similarity with the neighbouring chunks; priority = novelty-weight x novelty +
instability-weight x (1 - stability)^2, chunks quieter than --void-db get 0. The parameters and
the chunk size travel in the parquet's metadata. --plot draws one source's curves (matplotlib).
A source that cannot be scored is listed and the run exits 1; the others are still written and
the file records what is missing, so a rerun redoes it.
"""


class Novelty(str, Enum):
    crossover = "crossover"
    velocity = "velocity"
    activity = "activity"




def command(
    codes: Annotated[Path, typer.Argument(help="Codes folder (with manifest.parquet) or the manifest itself.",
                                          metavar="CODES")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Chunk scores .parquet, or - for stdout.",
                                      allow_dash=True)],
    chunk_seconds: Annotated[float | None, typer.Option(help="Chunk length in seconds [default: 0.75].")] = None,
    bpm: Annotated[float | None, typer.Option(help="Musical chunking: tempo in beats per minute.")] = None,
    beats_per_chunk: Annotated[float, typer.Option(help="Musical chunking: beats per chunk.")] = 2.0,
    novelty: Annotated[Novelty, typer.Option(help="Novelty measure.")] = Novelty.crossover,
    fast_seconds: Annotated[float, typer.Option(help="Fast moving-average time constant.")] = 4.0,
    slow_seconds: Annotated[float, typer.Option(help="Slow moving-average time constant.")] = 90.0,
    stability_seconds: Annotated[float, typer.Option(help="Window of neighbours for stability.")] = 6.0,
    novelty_weight: Annotated[float, typer.Option(help="Priority weight of novelty.")] = 0.7,
    instability_weight: Annotated[float, typer.Option(help="Priority weight of (1 - stability)^2.")] = 0.3,
    smooth_seconds: Annotated[float, typer.Option(help="Gaussian smoothing of the priority (0 = none).")] = 0.0,
    void_db: Annotated[float, typer.Option(help="Chunks below this RMS (dBFS) are void: priority 0.")] = -50.0,
    plot: Annotated[Path | None, typer.Option(help="Also draw one source's curves to this PNG.")] = None,
    plot_source: Annotated[str | None, typer.Option(help="Source id to plot [default: the first].")] = None,
    workers: Annotated[int, typer.Option(help="Threads loading and scoring sources.")] = 4,
    overwrite: Overwrite = False,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    if chunk_seconds is not None and bpm is not None:
        raise typer.BadParameter("give --chunk-seconds or --bpm, not both", param_hint="--bpm")
    if workers < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--workers")
    from valle_cli import formats
    from valle_cli.common import refuse_output_over_input
    from valle_cli.data import chunks

    inputs = [codes, codes / formats.MANIFEST_NAME if codes.is_dir() else None]
    refuse_output_over_input(out, inputs)
    if plot is not None:
        refuse_output_over_input(plot, inputs, flag="--plot")
    try:
        params = chunks.ChunkParams(chunk_seconds=0.75 if chunk_seconds is None else chunk_seconds, bpm=bpm,
                                    beats_per_chunk=beats_per_chunk, novelty=novelty.value, fast_seconds=fast_seconds,
                                    slow_seconds=slow_seconds, stability_seconds=stability_seconds,
                                    novelty_weight=novelty_weight, instability_weight=instability_weight,
                                    smooth_seconds=smooth_seconds, void_db=void_db)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if plot is not None:
        chunks.require_matplotlib()

    if str(out) != formats.STDIO and out.exists() and not overwrite:
        df, meta = chunks.read_finished(out)
        if df is not None:
            Log.info(f"{out} exists, skipping (--overwrite to redo)")
            _plot_finished(df, meta["params"], plot, plot_source)
            return
        Log.info(f"{out} is incomplete ({len(meta['incomplete'])} source(s) missing): scoring again")

    _, manifest = chunks.load_manifest(codes)
    with progress("score-chunks", total=float(manifest["seconds"].sum()), unit="audio s") as advance:
        result = chunks.score_chunks(codes, out, params, plot=plot, plot_source_id=plot_source, device=device,
                                     workers=workers, on_progress=advance)
    report = result.report
    Log.info(f"{report.sources} source(s) scored ({report.decoded} from decoded codes): {report.chunks} chunks of "
             f"{result.params['chunk_frames']} frames, {report.void_chunks} void; "
             f"{report.audio_seconds / 3600:.2f} h of audio at {report.hours_per_minute:.1f} h/min "
             f"-> {formats.display_name(out, output=True)}")
    if plot is not None:
        Log.info(f"plot of {plot_source or result.df['id'][0]} -> {plot}")


def _plot_finished(df: object, params: dict, plot: Path | None, plot_source: str | None) -> None:
    """The plot of an output that was finished already: drawn unless it exists too."""
    if plot is None or skip_existing(plot, overwrite=False, redo="redraw"):
        return
    from valle_cli.data.chunks import plot_source as draw

    source = plot_source if plot_source is not None else df["id"][0]
    draw(df, params, source, plot)
    Log.info(f"plot of {source} -> {plot}")


def register(app: typer.Typer) -> None:
    app.command("score-chunks", help=HELP, short_help="Codes -> per-chunk novelty/stability/priority parquet.",
                no_args_is_help=True)(command)
