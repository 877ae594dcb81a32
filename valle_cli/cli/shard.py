"""valle shard: codes folders + phonemes files -> training shards (shard-NNNNNN.bin) + index.parquet."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from valle_cli.cli.options import Log, Overwrite, Quiet, Seed, Verbose, progress

HELP = """Example: valle shard codes/ phonemes.parquet -o shards/

Pack codes and text tokens into training shards: shards/shard-000000.bin, ... (a header, then
uint16 records: text tokens followed by codes K x T) and shards/index.parquet, one row per
utterance (id, speaker, split, shard, offset, text_len, frames, seconds, weight, prompts).

INPUTS are codes folders (valle quantize) and phonemes files (valle phonemize), joined by utterance
id; all codes must come from one codec, all text from one tokenizer. Utterances whose transcript or
codes are missing, whose audio is outside --min-seconds..--max-seconds or whose text is longer than
--max-text-tokens are left out and counted by reason. --val-fraction holds out that share of the
utterances (at least one, from two utterances on), or whole speakers with --split-by speaker,
chosen by a hash of the id (or speaker) and --seed: the same split whatever the input order. The
speaker is a 'speaker' column if an input has one, else the first --speaker-depth folders of the
id. --chunks (valle score-chunks) weights each utterance by its mean chunk priority (default 1).
--no-text shards codes alone (empty texts), for audio continuation and in-fill training.
An output with an index.parquet is finished and skipped; --overwrite redoes it.
"""


class SplitBy(str, Enum):
    utterance = "utterance"
    speaker = "speaker"


Inputs = Annotated[list[Path], typer.Argument(help="Codes folders and phonemes .parquet files.", metavar="INPUTS")]
Out = Annotated[Path, typer.Option("--out", "-o", allow_dash=True, help="Output folder for the shards and index.")]
Chunks = Annotated[list[Path] | None, typer.Option(
    "--chunks", help="Chunk scores (.parquet from valle score-chunks) for sampling weights; repeatable.")]
MinSeconds = Annotated[float, typer.Option(help="Leave out shorter utterances (seconds).")]
MaxSeconds = Annotated[float, typer.Option(help="Leave out longer utterances (seconds).")]
MaxText = Annotated[int, typer.Option(help="Leave out utterances with more text tokens.")]
ValFraction = Annotated[float, typer.Option(min=0.0, max=0.999, help="Share held out for validation.")]
SplitByOpt = Annotated[SplitBy, typer.Option(help="Hold out single utterances or whole speakers.")]
SpeakerDepth = Annotated[int, typer.Option(min=0, help="Folders of the id that name the speaker.")]
ShardMb = Annotated[float, typer.Option(help="Size of one shard's body (MiB).")]
MaxPrompts = Annotated[int, typer.Option(min=0, help="Prompt candidates listed per utterance.")]
NoText = Annotated[bool, typer.Option("--no-text", help="Audio only (no phonemes): for continuation / in-fill "
                                      "training (valle train --task continuation).")]


def command(inputs: Inputs, out: Out, chunks: Chunks = None, min_seconds: MinSeconds = 0.5,
            max_seconds: MaxSeconds = 30.0, max_text_tokens: MaxText = 512, val_fraction: ValFraction = 0.02,
            split_by: SplitByOpt = SplitBy.utterance, speaker_depth: SpeakerDepth = 1, shard_mb: ShardMb = 256.0,
            max_prompts: MaxPrompts = 64, no_text: NoText = False, overwrite: Overwrite = False, seed: Seed = 0,
            quiet: Quiet = False, verbose: Verbose = 0) -> None:
    Log.configure(quiet, verbose)
    from valle_cli.common import refuse_output_over_input
    from valle_cli.data.shards import SPLITS, ShardOptions, build_shards
    from valle_cli.errors import InputError
    from valle_cli.formats import MANIFEST_NAME

    if str(out) == "-":
        raise InputError("shards are a folder of files: -o must name a folder, not - (stdout)")
    codes, phonemes = [], []
    for path in inputs:  # a folder (or its manifest.parquet) is codes, any other file is phonemes
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir() or path.name == MANIFEST_NAME:
            codes.append(path if path.is_dir() else path.parent)
        else:
            phonemes.append(path)
    refuse_output_over_input(out, [*inputs, *codes, *(chunks or ())])
    if not codes:
        raise InputError("no codes folder among the inputs (make one with valle quantize audio/ -o codes/)")
    if not phonemes and not no_text:
        raise InputError("no phonemes file among the inputs (make one with valle phonemize corpus/ -o ph.parquet, "
                         "or pass --no-text for audio-only shards)")
    if phonemes and no_text:
        raise InputError("--no-text makes audio-only shards: drop the phonemes file(s)")
    options = ShardOptions(min_seconds=min_seconds, max_seconds=max_seconds, max_text_tokens=max_text_tokens,
                           val_fraction=val_fraction, split_by=split_by.value, speaker_depth=speaker_depth,
                           seed=seed or 0, shard_mb=shard_mb, max_prompts=max_prompts)

    with progress("shard", total=None, unit="utt") as advance:
        report = build_shards(codes, phonemes, out, chunks=chunks or (), options=options, overwrite=overwrite,
                              on_progress=advance)
    if report.skipped:
        Log.info(f"{out} is finished (index.parquet exists), skipping (--overwrite to redo)")
        return

    for note in report.notes:
        Log.warn(note)
    for where, other in (("codes", "phonemes"), ("phonemes", "codes")):
        if report.only_in[where]:
            why = "missing transcript" if where == "codes" else "missing codes"
            Log.warn(f"{report.only_in[where]} id(s) in the {where} but not in the {other}, left out "
                     f"(e.g. {', '.join(report.examples.get(why, [])[:3])})")
    if report.unscored:
        Log.warn(f"{report.unscored} utterance(s) have no chunk scores: given the mean weight")
    kept = sum(report.utterances.values())
    splits = ", ".join(f"{name} {report.utterances[name]} ({report.speakers[name]} speakers, "
                       f"{report.seconds[name] / 3600:.2f} h)" for name in SPLITS)
    Log.info(f"{kept} utterances kept: {splits}")
    filtered = ", ".join(f"{n} {why}" for why, n in report.filtered.items() if n) or "none"
    Log.info(f"filtered: {filtered}")
    for why, ids in report.examples.items():
        Log.detail(f"  {why}: {', '.join(ids)}{' ...' if report.filtered[why] > len(ids) else ''}")
    speed = kept / max(report.wall_seconds, 1e-9)
    Log.info(f"{report.shards} shard(s), {report.bytes / 2**20:.1f} MiB at {speed:,.0f} utt/s -> {out}")


def register(app: typer.Typer) -> None:
    app.command("shard", help=HELP, short_help="Codes + phonemes -> training shards (.bin + index.parquet).",
                no_args_is_help=True)(command)
