"""valle evaluate: WER, CER and speaker similarity of generated audio, next to the references' ceiling."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Verbose, progress

HELP = """Example: valle evaluate rows.csv samples/ -o report/ --references corpus/

Score what valle sample --manifest rows.csv -o samples/ generated against what was asked.

Each id|text|prompt row of the manifest is matched with samples/<id>.npz (decoded with the codec it
records) or samples/<id>.wav; ids without an output are listed, not fatal. Per item: WER and CER of
an offline recogniser (pocketsphinx, with a closed-vocabulary language model made of all the
manifest texts: --lm unigram, the default, or bigram) on normalised text, and the speaker similarity
of the output to its prompt (--similarity-encoder ge2e, mfcc, or codes with --checkpoint).

--references refs/ scores ground-truth audio for the same ids (refs/<id>.wav or .npz) the same way,
and --codec-references also its resynthesis through the outputs' codec (quantize + decode), so
every figure sits next to its ceiling; the summary gives the ratios output / reference of the mean
WER and SIM.

-o report/ gets scores.csv (one row per item), summary.json (means, ratios, the LM and encoder
used, counts, missing ids and failures) and index.html with audio players, spectrograms, scores and,
with --run run/, the training curves. --held-out-from shards/ also reports the voices the model
never trained on apart from the others (an item's voice is the folder of its prompt file).
An existing report is kept unless --overwrite.
Needs pip install pocketsphinx jiwer (and resemblyzer webrtcvad-wheels for ge2e).
"""


class LanguageModel(str, Enum):
    unigram = "unigram"
    bigram = "bigram"


class EncoderName(str, Enum):
    ge2e = "ge2e"
    mfcc = "mfcc"
    codes = "codes"


_LISTED = 8  # missing ids named in the warning
_PRODUCTS = ("scores.csv", "summary.json", "index.html")


def command(
    manifest: Annotated[Path, typer.Argument(help="The id|text|prompt rows given to valle sample --manifest.",
                                                   metavar="MANIFEST")],
    outputs: Annotated[Path, typer.Argument(help="Folder of generated <id>.npz or <id>.wav.", metavar="OUTPUTS")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")],
    references: Annotated[Path | None, typer.Option(help="Folder of ground-truth <id>.wav/.npz.")] = None,
    codec_references: Annotated[bool, typer.Option(
        "--codec-references", help="Also score the references resynthesised by the outputs' codec.")] = False,
    lm: Annotated[LanguageModel, typer.Option("--lm", help="Closed-vocabulary LM of the recogniser.")] = (
        LanguageModel.unigram),
    encoder: Annotated[EncoderName, typer.Option("--similarity-encoder", "-e", help="Speaker embedding.")] = (
        EncoderName.ge2e),
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint or run folder (-e codes).")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Training run folder: its curves go in the page.")] = None,
    held_out_from: Annotated[Path | None, typer.Option(help="Shards folder: report its held-out voices (val "
                                                       "speakers with no training utterance) apart.")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    if codec_references and references is None:
        raise typer.BadParameter("--codec-references resynthesises the references: give --references refs/",
                                 param_hint="--codec-references")
    if encoder is EncoderName.codes and checkpoint is None:
        raise typer.BadParameter("-e codes needs --checkpoint run/", param_hint="--checkpoint")
    if encoder is not EncoderName.codes and checkpoint is not None:
        raise typer.BadParameter("only -e codes uses a checkpoint", param_hint="--checkpoint")
    if run is not None and not run.is_dir():
        raise typer.BadParameter(f"{run}: no such run folder", param_hint="--run")
    from valle_cli.common import refuse_output_over_input

    refuse_output_over_input(out, [manifest, outputs, references, run, held_out_from, checkpoint])
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out}: not a folder", param_hint="--out")
    if any((out / name).exists() for name in _PRODUCTS) and not overwrite:
        Log.info(f"{out} has a report, skipping (--overwrite to redo)")
        return

    from valle_cli.evaluation import evaluate as ev
    from valle_cli.evaluation.report import write_report
    from valle_cli.formats import read_sample_manifest

    ev.require_tools()
    rows = len(read_sample_manifest(manifest))
    held_out = ev.held_out_voices(held_out_from) if held_out_from is not None else None
    roles = 1 + (references is not None) + codec_references
    with progress("score", total=rows * roles, unit="audio") as advance:
        report = ev.evaluate(manifest, outputs, references=references, codec_references=codec_references,
                             lm=lm.value, encoder=encoder.value, checkpoint=checkpoint, device=device,
                             audio_dir=out / "audio", held_out=held_out, on_progress=advance)
    _warn(report.summary, outputs)
    with progress("report", total=len(report.items), unit="items") as advance:
        index = write_report(report, out, run=run, on_progress=advance)
    if run is not None and not (out / "img" / "curves.png").exists():
        Log.warn(f"{run}: no curves.png nor log.jsonl, the page has no training curves")
    for line in _describe(report.summary):
        Log.info(line)
    Log.info(f"-> {index}")


def _warn(summary: dict[str, Any], outputs: Path) -> None:
    missing = summary["missing"]
    if missing:
        names = ", ".join(missing[:_LISTED]) + (", ..." if len(missing) > _LISTED else "")
        Log.warn(f"{len(missing)} id(s) have no output in {outputs}, not scored: {names}")
    for uid, reason in summary["failures"].items():
        Log.warn(f"{uid}: {reason}")
    if summary["out_of_vocabulary"]:
        Log.warn(f"not in the pronouncing dictionary, never recognised: {', '.join(summary['out_of_vocabulary'])}")


def _describe(summary: dict[str, Any]) -> list[str]:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{summary['counts']['scored']} of {summary['counts']['rows']} item(s) scored; {summary['recogniser']}; "
             f"SIM: {summary['encoder']} cosine to the prompt"]
    for role, m in summary["means"].items():
        lines.append(f"{role.replace('_', ' ')}: WER {fmt(m['wer'])}  CER {fmt(m['cer'])}  SIM {fmt(m['sim'])}")
    for role, r in summary["ratios"].items():
        lines.append(f"output / {role.replace('_', ' ')}: WER x{fmt(r['wer'])}  SIM x{fmt(r['sim'])}")
    for group, part in summary.get("by_voice", {}).items():
        m = part["means"]["output"]
        label = f"held-out voices ({', '.join(summary['held_out_voices'])})" if group == "held_out" else "seen voices"
        lines.append(f"{label}: output WER {fmt(m['wer'])}  SIM {fmt(m['sim'])} over {m['n']} item(s)")
    return lines


def register(app: typer.Typer) -> None:
    app.command("evaluate", help=HELP, short_help="WER, CER and speaker similarity of generated audio (report).",
                no_args_is_help=True)(command)
