"""valle quantize: audio -> codec codes (.npz per utterance + manifest.parquet)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Seed, Verbose, progress, skip_existing

if TYPE_CHECKING:
    from valle_cli.codecs.quantize import FitOptions

HELP = """Example: valle quantize audio/ -o codes/

Encode audio into codec codes.

With no --codec, a built-in codec is fitted on (a sample of) the input and saved as
codes/codec.safetensors (reused on reruns); it needs no download. --codec PATH reuses a fitted
codec file; --codec encodec[:1.5|3|6|12|24] or dac[:44khz|24khz|16khz] use pretrained codecs.
A folder is mirrored into one .npz per file plus manifest.parquet; finished files are skipped on
a rerun (--overwrite redoes them). A single file (or - for stdin) gives one .npz (or - for stdout)
and needs --codec. --fit-codec only fits: valle quantize --fit-codec audio/ -o codec.safetensors
"""


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise typer.BadParameter(f"{text!r}: need 0 <= i < n")
    return i, n


def command(
    input: Annotated[Path, typer.Argument(help="Audio folder, audio file, or - for stdin.", allow_dash=True,
                                                 metavar="INPUT")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Codes folder, .npz file, - for stdout, "
                                      "or the codec file with --fit-codec.", allow_dash=True)],
    codec: Annotated[str | None, typer.Option(help="Codec file or encodec[:KBPS] / dac[:MODEL].")] = None,
    fit_codec: Annotated[bool, typer.Option("--fit-codec", help="Only fit a built-in codec on INPUT.")] = False,
    fit_seconds: Annotated[float, typer.Option(help="Audio sampled for fitting (seconds).")] = 1200.0,
    codebooks: Annotated[int, typer.Option(help="Built-in codec: residual codebooks.")] = 8,
    codebook_size: Annotated[int, typer.Option(help="Built-in codec: entries per codebook.")] = 1024,
    frame_rate: Annotated[float, typer.Option(help="Built-in codec: code frames per second (24000 / a whole "
                                              "hop: 75, 50, 37.5, 25, ...).")] = 75.0,
    batch_seconds: Annotated[float | None, typer.Option(
        help="Padded audio seconds per encoder batch [default: 120 on a GPU, 20 on CPU].", show_default=False,
    )] = None,
    workers: Annotated[int, typer.Option(help="Threads loading audio.")] = 4,
    encoders: Annotated[int | None, typer.Option(
        help="Threads encoding batches [default: 1 on a GPU, one per core on CPU].", show_default=False,
    )] = None,
    shard: Annotated[str | None, typer.Option(help="Process part i of n (0-based), e.g. 0/4.")] = None,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    part = _parse_shard(shard)
    from valle_cli.codecs import quantize as lib
    from valle_cli.common import refuse_output_over_input, resolve_device, seed_everything
    from valle_cli.errors import InputError

    if str(input) != "-" and not input.exists():
        raise InputError(f"{input}: no such file or folder")
    refuse_output_over_input(out, [input, codec if codec and Path(codec).exists() else None])
    seed_everything(seed)
    dev = resolve_device(device)
    fit = lib.FitOptions(seconds=fit_seconds, n_codebooks=codebooks, codebook_size=codebook_size,
                         frame_rate=frame_rate, seed=seed)
    if fit_codec:
        if str(out) == "-":
            raise InputError("--fit-codec writes a codec file: name it with -o codec.safetensors")
        if skip_existing(out, overwrite, redo="refit"):
            return
        lib.fit_codec_file(input, out, fit, dev, say=Log.info, detail=Log.detail)
    elif str(input) != "-" and input.is_dir():
        _quantize_folder(input, out, codec, fit, dev, part, batch_seconds, workers, encoders, overwrite)
    else:
        _quantize_file(input, out, codec, dev, overwrite)


def _quantize_folder(input: Path, out: Path, codec: str | None, fit: FitOptions, device: str, part: tuple[int, int],
                     batch_seconds: float | None, workers: int, encoders: int | None, overwrite: bool) -> None:
    from valle_cli.codecs import describe
    from valle_cli.codecs import quantize as lib
    from valle_cli.errors import InputError

    if str(out) == "-":
        raise InputError("a folder of audio gives a folder of codes: -o must name a folder")
    the_codec = lib.folder_codec(input, out, codec, fit, device, part, say=Log.info, detail=Log.detail)
    Log.detail(f"codec: {describe(the_codec.spec)} on {device}")
    total = lib.pending_seconds(input, out, overwrite, part)
    with progress("quantize", total=total, unit="audio s") as advance:
        report = lib.quantize_folder(input, out, the_codec, batch_seconds=batch_seconds, workers=workers,
                                     encoders=encoders, overwrite=overwrite, shard=part, on_progress=advance)
    speed = report.audio_seconds / max(report.wall_seconds, 1e-9)
    Log.info(f"{report.written} quantized, {report.skipped} already done, "
             f"{report.audio_seconds:.1f} s of audio at {speed:.1f} audio s/s -> {out}")


def _quantize_file(input: Path, out: Path, codec: str | None, device: str, overwrite: bool) -> None:
    """One file (or stdin) -> one npz (or stdout)."""
    from valle_cli import formats
    from valle_cli.codecs import load_codec
    from valle_cli.codecs.quantize import quantize_file
    from valle_cli.errors import InputError

    if codec is None:
        raise InputError("quantizing a single file needs --codec (a fitted codec file, encodec or dac)")
    if skip_existing(out, overwrite):
        return
    the_codec = load_codec(codec, device)
    source = formats.read_input_bytes("-") if str(input) == "-" else input
    item = quantize_file(source, the_codec, name=formats.display_name(input))
    formats.write_codes(out, item)
    where = formats.display_name(out, output=True)
    Log.info(f"{item.n_codebooks} x {item.n_frames} codes ({item.seconds:.2f} s) -> {where}")


def register(app: typer.Typer) -> None:
    app.command("quantize", help=HELP, short_help="Audio -> codec codes (.npz per utterance + manifest).",
                no_args_is_help=True)(command)
