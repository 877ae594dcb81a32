"""valle phonemize: transcripts -> phonemes.parquet (espeak-ng IPA + token ids + tokenizer)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from valle_cli.cli.options import Log, Overwrite, Quiet, Verbose, progress, skip_existing

HELP = """Example: valle phonemize metadata.csv -o phonemes.parquet

Turn transcripts into espeak-ng IPA phonemes and token ids, in one parquet file.

INPUT is a text file (one utterance a line, ids <stem>-<line>), an id|text table (LJSpeech
metadata.csv takes the normalized column; audio_path|text with or without a header; .tsv for
tabs), a corpus folder with .txt/.lab transcripts beside the audio (ids spk/utt, as quantize
names the codes), or - for lines on stdin. English is normalised first (numbers, currency,
abbreviations). An empty transcript stops the run with nothing written unless --skip-bad.
--vocab reuses the tokenizer of an existing phonemes file, so new data gets a model's ids.
"""


class TokenizerKind(str, Enum):
    phoneme = "phoneme"
    bpe = "bpe"


def _list_langs(value: bool) -> None:
    if value:
        from valle_cli.text.phonemize import list_languages

        for code, name in sorted(list_languages().items()):
            print(f"{code}\t{name}")
        raise typer.Exit()


Input = Annotated[str, typer.Argument(help="Text file, id|text table, corpus folder, or - for stdin.")]
Out = Annotated[Path, typer.Option("--out", "-o", allow_dash=True, help="Output .parquet, or - for stdout.")]
Lang = Annotated[str, typer.Option(help="espeak-ng language (see --list-langs).")]
Kind = Annotated[TokenizerKind | None, typer.Option(
    "--tokenizer", help="phoneme: one id per IPA symbol (default); bpe: byte-level BPE learned here.")]
Vocab = Annotated[Path | None, typer.Option(help="Reuse the tokenizer of this phonemes .parquet.")]
BpeSize = Annotated[int, typer.Option(help="BPE: ids in all (256 bytes + merges + 3 specials).")]
Punctuation = Annotated[bool, typer.Option("--punctuation/--no-punctuation", help="Keep punctuation.")]
Stress = Annotated[bool, typer.Option("--stress/--no-stress", help="Keep stress marks.")]
Normalize = Annotated[bool, typer.Option("--normalize/--no-normalize",
                                         help="Spell out numbers, abbreviations, ... (English).")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Leave out bad rows with a warning.")]
AllowUnk = Annotated[bool, typer.Option("--allow-unk", help="With --vocab: unknown symbols -> <unk>.")]
Jobs = Annotated[int | None, typer.Option("--jobs", "-j", min=1,
                                          help="espeak processes (default: 1, more for big inputs).")]
ListLangs = Annotated[bool, typer.Option("--list-langs", callback=_list_langs, is_eager=True,
                                         help="Print espeak-ng's languages and exit.")]


def command(input: Input, out: Out, lang: Lang = "en-us", tokenizer: Kind = None, vocab: Vocab = None,
            bpe_vocab_size: BpeSize = 512, punctuation: Punctuation = True, stress: Stress = True,
            normalize: Normalize = True, skip_bad: SkipBad = False, allow_unk: AllowUnk = False,
            jobs: Jobs = None, list_langs: ListLangs = False, overwrite: Overwrite = False,
            quiet: Quiet = False, verbose: Verbose = 0) -> None:
    Log.configure(quiet, verbose)
    if vocab is not None and tokenizer is not None:
        raise typer.BadParameter("--tokenizer and --vocab exclude each other (--vocab brings its tokenizer)")
    from valle_cli.common import refuse_output_over_input

    refuse_output_over_input(out, [input, vocab])
    if skip_existing(out, overwrite):
        return
    from valle_cli.formats import write_phonemes
    from valle_cli.text.phonemize import phonemize_corpus

    with progress("phonemize", total=None, unit="utt") as advance:
        result = phonemize_corpus(
            input, lang=lang, tokenizer=(tokenizer or TokenizerKind.phoneme).value, vocab=vocab,
            punctuation=punctuation, stress=stress, normalize=normalize, skip_bad=skip_bad,
            allow_unk=allow_unk, bpe_vocab_size=bpe_vocab_size, njobs=jobs, on_progress=advance,
        )
    write_phonemes(out, result.df, result.tokenizer_meta, result.settings)

    report = result.report
    for warning in report.warnings:
        Log.warn(warning)
    if report.skipped:
        Log.warn(f"left out {len(report.skipped)} bad row(s): {_first(report.skipped, '; ')}")
    if report.audio_without_text:
        Log.warn(f"{len(report.audio_without_text)} audio file(s) without a transcript: "
                 f"{_first(report.audio_without_text, ', ')}")
    if report.unk_rows:
        Log.warn(f"{report.unk_rows} row(s) have symbols mapped to <unk>")
    Log.detail(f"settings: {result.settings}")
    if result.df.height:
        Log.detail(f"first row: {result.df['id'][0]}: {result.df['phonemes'][0]}")
    blank = f", {report.blank_lines} blank line(s) skipped" if report.blank_lines else ""
    Log.info(f"phonemized {report.rows} utterance(s){blank} in {report.seconds:.2f} s "
             f"({report.utterances_per_second:,.0f} utt/s); {result.tokenizer.kind} tokenizer, "
             f"{result.tokenizer.vocab_size} ids -> {'<stdout>' if str(out) == '-' else out}")


def _first(items: list, sep: str, n: int = 3) -> str:
    return sep.join(str(x) for x in items[:n]) + (" ..." if len(items) > n else "")


def register(app: typer.Typer) -> None:
    app.command("phonemize", help=HELP, short_help="Transcripts -> IPA phonemes + token ids (.parquet).",
                no_args_is_help=True)(command)
