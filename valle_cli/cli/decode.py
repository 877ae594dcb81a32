"""valle decode: codes (.npz) -> wav, with the codec the codes record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Verbose, progress, skip_existing

HELP = """Example: valle quantize a.wav -o - --codec codec.safetensors | valle decode - -o a_resynth.wav

Decode codec codes back to audio.

Takes one .npz (or - for stdin) to one .wav (or - for stdout), or a folder of .npz to a folder
of .wav (finished files skipped; --overwrite redoes them). The codec is the one recorded in the
codes; --codec names it explicitly and must match.
"""


def command(
    input: Annotated[Path, typer.Argument(help="Codes .npz, folder of them, or - for stdin.", allow_dash=True,
                                                 metavar="INPUT")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .wav, folder, or - for stdout.",
                                      allow_dash=True)],
    codec: Annotated[str | None, typer.Option(help="Codec file / name; must match the codes.")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    from valle_cli import formats
    from valle_cli.codecs import load_codec
    from valle_cli.codecs.audio import wav_bytes
    from valle_cli.codecs.decode import CodecCache, decode_folder, decode_item
    from valle_cli.common import refuse_output_over_input, resolve_device
    from valle_cli.errors import InputError

    refuse_output_over_input(out, [input, codec if codec and Path(codec).exists() else None])
    dev = resolve_device(device)
    codecs = CodecCache(dev, load_codec(codec, dev) if codec else None)
    if str(input) != "-" and input.is_dir():
        if str(out) == "-":
            raise InputError("a folder of codes gives a folder of wavs: -o must name a folder")
        total = sum(1 for _ in input.rglob("*.npz"))
        with progress("decode", total=total, unit="files") as advance:
            report = decode_folder(input, out, codecs, overwrite=overwrite, on_progress=advance)
        Log.info(f"{report.written} decoded, {report.skipped} already done, "
                 f"{report.audio_seconds:.1f} s of audio in {report.wall_seconds:.1f} s -> {out}")
        return
    if skip_existing(out, overwrite):
        return
    item = formats.read_codes(input)
    where = None if str(input) == "-" else input.parent
    the_codec = codecs.for_codes(item, where, formats.display_name(input))
    wav = decode_item(item, the_codec, formats.display_name(input))
    formats.write_output_bytes(out, wav_bytes(wav, the_codec.sample_rate))
    Log.info(f"{len(wav) / the_codec.sample_rate:.2f} s of audio -> {formats.display_name(out, output=True)}")


def register(app: typer.Typer) -> None:
    app.command("decode", help=HELP, short_help="Codes (.npz) -> audio (.wav) with the codec they record.",
                no_args_is_help=True)(command)
