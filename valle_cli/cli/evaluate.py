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
manifest texts: --lm bigram, the default, or unigram) on normalised text, and the speaker similarity
of the output to its prompt (--similarity-encoder ge2e, mfcc, or codes with --checkpoint).

--references refs/ scores ground-truth audio for the same ids (refs/<id>.wav or .npz) the same way,
and --codec-references also its resynthesis through the outputs' codec (quantize + decode): the
ceiling. On the same items, the floors: the ceiling's hypotheses scored against another item's text
(wrong-sentence WER) and the references against another voice's prompt (different-voice SIM). The
summary gives the ratios output / ceiling, the share of the floor-to-ceiling range the outputs
recover, the goals met or not, and the judge's separation check (ceiling WER at most half the
wrong-sentence WER). Durations: each output beside its reference, early stops (< 0.75x) and outputs
at the length cap of samples/samples.json flagged.

-o report/ gets scores.csv (one row per item), summary.json (every figure, the settings, counts,
missing ids and failures) and index.html, which explains each figure, with audio players and
spectrograms. --run run/ adds the training curves and the minutes of training at the samples'
step. --voices-from shards/ reports seen voices (in the training split) and unseen ones (any
other voice, eval-only voices too) apart; an item's voice is the folder of its prompt file.
--curve DIR (repeatable) adds a learning curve (a table and img/curve.png of WER, SIM, shares and
durations against the step and minutes): DIR is an earlier report folder, or a folder whose
subfolders are report folders. An existing report is kept unless --overwrite.
Needs pip install pocketsphinx jiwer (and resemblyzer webrtcvad-wheels for ge2e).
"""


class LanguageModel(str, Enum):
    bigram = "bigram"
    unigram = "unigram"


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
        LanguageModel.bigram),
    encoder: Annotated[EncoderName, typer.Option("--similarity-encoder", "-e", help="Speaker embedding.")] = (
        EncoderName.ge2e),
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint or run folder (-e codes).")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Training run folder: its curves and minutes of "
                                             "training go in the page.")] = None,
    voices_from: Annotated[Path | None, typer.Option("--voices-from", "--held-out-from", help="Shards folder: report "
                                                     "seen voices (training split) and unseen ones apart.")] = None,
    curve: Annotated[list[Path] | None, typer.Option("--curve", help="Earlier report folder, or a folder of them: "
                                                     "a learning curve (repeatable).")] = None,
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

    refuse_output_over_input(out, [manifest, outputs, references, run, voices_from, checkpoint])
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
    trained = ev.training_voices(voices_from) if voices_from is not None else None
    roles = 1 + (references is not None) + codec_references
    with progress("score", total=rows * roles, unit="audio") as advance:
        report = ev.evaluate(manifest, outputs, references=references, codec_references=codec_references,
                             lm=lm.value, encoder=encoder.value, checkpoint=checkpoint, device=device,
                             audio_dir=out / "audio", trained_voices=trained, run=run,
                             on_progress=advance)
    _warn(report.summary, outputs)
    with progress("report", total=len(report.items), unit="items") as advance:
        index = write_report(report, out, run=run, curve=curve or (), on_progress=advance)
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

    check = summary["judge"]["separation"]
    verdict = {True: "holds", False: "does NOT hold", None: "unchecked"}[check["holds"]]
    lines = [f"{summary['counts']['scored']} of {summary['counts']['rows']} item(s) scored; {summary['recogniser']}; "
             f"SIM: {summary['encoder']} cosine to the prompt",
             f"judge separation: ceiling WER {fmt(check['own_text_wer'])} vs wrong-sentence WER "
             f"{fmt(check['wrong_sentence_wer'])} ({verdict})"]
    for role, m in summary["means"].items():
        lines.append(f"{role.replace('_', ' ')}: WER {fmt(m['wer'])}  CER {fmt(m['cer'])}  SIM {fmt(m['sim'])}")
    for role, r in summary["ratios"].items():
        lines.append(f"output / {role.replace('_', ' ')}: WER x{fmt(r['wer'])}  SIM x{fmt(r['sim'])}")
    floors, shares, durations = summary["floors"], summary["shares"], summary["durations"]
    lines.append(f"floors: wrong-sentence WER {fmt(floors['wrong_sentence_wer'])}, different-voice SIM "
                 f"{fmt(floors['different_voice_sim'])}; share recovered: WER {fmt(shares['wer'])}  "
                 f"SIM {fmt(shares['sim'])}")
    lines.append(f"durations: {durations['within']} of {durations['n']} within +-25 %, "
                 f"{len(durations['early_stops'])} early stop(s), {len(durations['capped'])} capped")
    for group, part in summary.get("by_voice", {}).items():
        m = part["means"].get("output", {})
        label = f"unseen voices ({', '.join(summary['unseen_voices'])})" if group == "unseen" else "seen voices"
        lines.append(f"{label}: output WER {fmt(m.get('wer'))}  SIM {fmt(m.get('sim'))} over {m.get('n', 0)} item(s); "
                     f"shares WER {fmt(part['shares']['wer'])}  SIM {fmt(part['shares']['sim'])}")
    return lines


def register(app: typer.Typer) -> None:
    app.command("evaluate", help=HELP, short_help="WER, CER and speaker similarity of generated audio (report).",
                no_args_is_help=True)(command)
