"""valle sample: a checkpoint + text + a voice prompt -> codes (.npz), ready for valle decode."""

from __future__ import annotations

import textwrap
from dataclasses import Field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from valle_cli.cli.options import (
    Device,
    Log,
    Overwrite,
    Quiet,
    Verbose,
    no_such_option,
    placeholder,
    progress,
    skip_existing,
)
from valle_cli.generation.params import (  # no torch: the help lists them
    DEFAULT_MAX_SECONDS,
    PASSES,
    GenerateConfig,
    SamplingParams,
    sampler_field,
    with_settings,
)

HELP = """Example: valle sample run/ --text "Hello there." --prompt ref.wav -o - | valle decode - -o out.wav

Zero-shot TTS with a trained checkpoint (a run folder takes its last checkpoint; --best the best).
The prompt is audio (encoded with the model's codec) or codes (.npz from the same codec); several
--prompt files are joined, then cropped to --prompt-seconds. Several sentences in --text are
generated one by one, each prompted by the reference and the previous --context-history outputs,
and all of them are joined (the npz also lists the frames of each sentence). --manifest rows.csv
(id|text|prompt, '+' joins prompts) writes one npz per row into the -o folder, in batches.
Without text (a model trained with --task continuation): --continue-seconds S continues the
prompt audio by S seconds (--rollouts N times, each from the tape's last --context-seconds;
--chunks chunks.parquet starts from the prompt's highest-priority chunk instead), and
--infill-suffix B generates the middle between the --prompt and B; the npz holds the whole tape.

Defaults come from the checkpoint: the settings its run's TOML [sample] table saved (mode, steps,
max_seconds, sampler params); a flag given here wins. The --manifest folder gets samples.json
(checkpoint, step, the settings used).

--mode ar+nar: level 0 autoregressively (KV cache; until the stop token or --max-seconds), then
one NAR pass per further level. --mode nar-len: the duration from the len head (--duration to
force it), then --steps rounds of demasking. auto picks ar+nar when the model has the AR task.

A --duration, --continue-seconds or in-fill that does not fit in the model's context after the text
and prompt is refused with one line giving the room left in seconds; the AR pass stops each request
(each --manifest row) at its own context limit when that comes before --max-seconds.
"""


# ----------------------------------------------------------------------------- sampler flags (from SamplingParams)


def sampler_flag(field: Field[Any]) -> str:
    """``top_k`` -> ``top-k``: the flag of a SamplingParams field (also after --ar-, --nar-, --demask-)."""
    return field.name.replace("_", "-")


def sampler_flags_help() -> str:
    """One row per SamplingParams field: the flag, its value type, its meaning and its default in each pass."""
    defaults = GenerateConfig()
    rows = []
    for field in fields(SamplingParams):
        per_pass = [getattr(getattr(defaults, p), field.name) for p in PASSES]
        default = f"{per_pass[0]:g}" if len(set(per_pass)) == 1 else ", ".join(
            f"{p} {value:g}" for p, value in zip(PASSES, per_pass, strict=True))
        flag = f"--{sampler_flag(field)} {placeholder(type(field.default))}"
        rows.append(textwrap.fill(f"{field.metadata['help']}  [default: {default}]", width=78,
                                  initial_indent=f"{flag:<31}", subsequent_indent=" " * 31, break_on_hyphens=False))
    return ("\b\nSampler flags: --NAME sets every pass; --ar-NAME, --nar-NAME or --demask-NAME\n"
            "sets one pass (example: --ar-temperature 0.8 --top-k 50).\n\n\b\n" + "\n".join(rows))


def flag_settings(args: list[str]) -> dict[str, Any]:
    """The sampler flags in ``args`` (``--temperature 0.7``, ``--ar-top-k=50``, ...) as checked settings
    by canonical name (``{"temperature": 0.7, "ar_top_k": 50}``); a misspelled flag is a usage error."""
    types = {f.name: type(f.default) for f in fields(SamplingParams)}
    settings: dict[str, Any] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            raise typer.BadParameter(f"unexpected argument {flag!r}")
        name, _, value = flag[2:].partition("=")
        if not value:
            if i + 1 >= len(args):
                raise typer.BadParameter(f"{flag} needs a value")
            value, i = args[i + 1], i + 1
        i += 1
        field_of = sampler_field(name)
        if field_of is None:
            prefixes = ("", *(f"{p}-" for p in PASSES))
            flags = [sampler_flag(f) for f in fields(SamplingParams)]
            raise no_such_option(f"--{name}", also=[f"--{prefix}{n}" for prefix in prefixes for n in flags])
        kind = types[field_of[1]]
        try:
            settings[name.replace("-", "_")] = kind(value)
        except ValueError:
            raise typer.BadParameter(f"--{name} {value!r}: expected a {kind.__name__}") from None
    return settings


def generation_settings(checkpoint_defaults: dict[str, Any], flags: dict[str, Any]) -> tuple[GenerateConfig, float]:
    """The GenerateConfig and --max-seconds of a run: built-in defaults < the checkpoint's saved settings
    (its recipe's [sample] table) < the flags given."""
    settings = {**checkpoint_defaults, **flags}
    return with_settings(GenerateConfig(), settings), float(settings.get("max_seconds", DEFAULT_MAX_SECONDS))


# ----------------------------------------------------------------------------- the verb


class Mode(str, Enum):
    auto = "auto"
    ar_nar = "ar+nar"
    nar_len = "nar-len"


class Quantize(str, Enum):  # model.load.QUANTIZE
    none = "none"
    int8 = "int8"


def command(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder or a run folder (valle train).")],
    out: Annotated[Path, typer.Option("--out", "-o", allow_dash=True, help="Output .npz, - for stdout, or a "
                                      "folder with --manifest.")],
    text: Annotated[str | None, typer.Option(help="What to say (one or more sentences).")] = None,
    prompt: Annotated[list[Path] | None, typer.Option("--prompt", allow_dash=True,
                                                      help="Voice prompt: audio or codes .npz (repeatable).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Batch mode: id|text|prompt rows.")] = None,
    mode: Annotated[Mode | None, typer.Option(help="Decoding strategy [default: the checkpoint's, else auto].",
                                              show_default=False)] = None,
    max_seconds: Annotated[float | None, typer.Option(
        min=0.01, help=f"AR: stop after this much audio [default: the checkpoint's, else {DEFAULT_MAX_SECONDS:g}].",
        show_default=False)] = None,
    duration: Annotated[float | None, typer.Option(help="NAR-len: seconds to generate (default: predicted).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="NAR-len demasking rounds [default: the checkpoint's, "
                                              "else 25].", show_default=False)] = None,
    prompt_seconds: Annotated[float | None, typer.Option(help="Crop the prompt to this many seconds "
                                                         "(default: the longest training prompt).")] = None,
    context_history: Annotated[int, typer.Option(min=0, help="Long-form: earlier sentences in the prompt.")] = 1,
    lang: Annotated[int, typer.Option(help="Language id.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Manifest rows generated together.")] = 8,
    continue_seconds: Annotated[float | None, typer.Option(help="No text: continue the prompt audio by this "
                                                           "many seconds.")] = None,
    rollouts: Annotated[int, typer.Option(min=1, help="Continuation: iterations, each continuing the tape.")] = 1,
    context_seconds: Annotated[float | None, typer.Option(help="Continuation: seconds of the tape each rollout "
                                                          "sees (default: half the training window).")] = None,
    chunks: Annotated[Path | None, typer.Option(help="Continuation: start from the prompt's highest-priority "
                                                "chunk (a score-chunks parquet of its source).")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the AR one-frame step (transformer "
                                           "arch; pays off on a GPU for long outputs).")] = False,
    quantize: Annotated[Quantize, typer.Option(help="int8: weight-only int8 linear layers (faster decoding on a "
                                               "CPU; outputs differ a little from fp32).")] = Quantize.none,
    infill_suffix: Annotated[list[Path] | None, typer.Option(help="No text: generate the middle between the "
                                                             "--prompt (prefix) and this audio (suffix).")] = None,
    best: Annotated[bool, typer.Option("--best", help="Use the run's best checkpoint, not its last.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Reproducible sampling.")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    from valle_cli import formats
    from valle_cli.common import refuse_output_over_input, resolve_device
    from valle_cli.generation.generate import GenerateStats
    from valle_cli.generation.synthesizer import Synthesizer

    flags = flag_settings(ctx.args)
    given = {"mode": mode.value if mode else None, "steps": steps, "max_seconds": max_seconds}
    flags.update({k: v for k, v in given.items() if v is not None})
    check_inputs(out, text, prompt, manifest, continue_seconds, infill_suffix)
    refuse_output_over_input(out, [checkpoint, *(prompt or ()), *(infill_suffix or ()), chunks, manifest])
    if manifest is not None:
        check_manifest_outputs(manifest, out)
    if manifest is None and skip_existing(out, overwrite):
        return
    synth = Synthesizer.load(checkpoint, resolve_device(device), which="best" if best else "last",
                             quantize=quantize.value)
    config, max_seconds = generation_settings(synth.sampling_defaults(), flags)
    config = replace(config, compile=compile_, max_frames=max(1, int(round(max_seconds * synth.frame_rate))))
    Log.detail(f"checkpoint {synth.folder} (step {synth.meta['step']}, {synth.meta['model']['arch']}, "
               f"{synth.meta['codec'].get('name')})")
    stats = GenerateStats()
    if manifest is not None:
        with progress("sample", total=len(formats.read_sample_manifest(manifest)), unit="utt") as advance:
            report = synth.tts_manifest(manifest, out, config, prompt_seconds=prompt_seconds, lang=lang,
                                        batch_size=batch_size, seed=seed, overwrite=overwrite, stats=stats,
                                        on_progress=advance)
        Log.info(f"{report.written} sampled, {report.skipped} already done ({timing(stats)}) -> {out}")
        return
    prompts: list[Any] = [formats.read_input_bytes("-") if str(p) == "-" else p for p in prompt]
    if continue_seconds is not None:
        item = synth.continuation(prompts, continue_seconds, config, rollouts, context_seconds, lang, seed, stats,
                                  chunks=chunks)
    elif infill_suffix:
        item = synth.infill(prompts, list(infill_suffix), config, duration, lang, seed, stats)
    else:
        item = synth.tts(text, prompts, config, prompt_seconds=prompt_seconds, context_history=context_history,
                         lang=lang, duration_seconds=duration, seed=seed, stats=stats)
    formats.write_output_bytes(out, formats.codes_to_bytes(item))
    Log.info(f"{describe_output(item, synth.frame_rate, text is None)} ({timing(stats)}) -> "
             f"{formats.display_name(out, output=True)}")


def check_inputs(out: Path, text: str | None, prompt: list[Path] | None, manifest: Path | None,
                 continue_seconds: float | None, infill_suffix: list[Path] | None) -> None:
    """One of: --text + --prompt, --manifest, or (no text) --prompt with --continue-seconds or --infill-suffix."""
    from valle_cli.errors import InputError

    audio_only = continue_seconds is not None or bool(infill_suffix)
    if audio_only and (text is not None or manifest is not None):
        raise InputError("--continue-seconds / --infill-suffix take no --text or --manifest")
    if continue_seconds is not None and infill_suffix:
        raise InputError("choose one of --continue-seconds and --infill-suffix")
    if audio_only and not prompt:
        raise InputError("continuation and in-fill need --prompt (the audio to continue, or the in-fill prefix)")
    if not audio_only and manifest is None and (text is None or not prompt):
        raise InputError("give --text and --prompt (or --manifest rows.csv for a batch)")
    if manifest is not None and (text is not None or prompt):
        raise InputError("--manifest takes its texts and prompts from the file: drop --text / --prompt")
    if manifest is not None and str(out) == "-":
        raise InputError("--manifest writes one npz per row: -o must name a folder")


def check_manifest_outputs(manifest: Path, out: Path) -> None:
    """No row's output (``out/<id>.npz``) is one of the prompts of the manifest: sampling would replace it."""
    from valle_cli.common import refuse_output_over_input
    from valle_cli.formats import read_sample_manifest

    rows = read_sample_manifest(manifest)
    prompts = [p for _, _, row_prompts in rows for p in row_prompts]
    for uid, _, _ in rows:
        refuse_output_over_input(out / f"{uid}.npz", prompts, flag=f"row {uid!r} of {manifest}: its output")


def describe_output(item: Any, frame_rate: float, audio_only: bool) -> str:
    """'2.40 s of codes in 2 sentences', or for a tape (continuation, in-fill) its parts: '3.00 + 1.00 s of codes'."""
    segments = item.extra.get("segments")
    if audio_only:
        return " + ".join(f"{n / frame_rate:.2f}" for n in segments) + " s of codes"
    sentences = f" in {len(segments)} sentences" if segments is not None else ""
    return f"{item.codes.shape[1] / frame_rate:.2f} s of codes{sentences}"


def timing(stats: Any) -> str:
    parts = []
    if stats.ar_frames:
        parts.append(f"AR {stats.ar_frames / max(stats.ar_seconds, 1e-9):,.0f} frames/s")
    if stats.demask_seconds:
        parts.append(f"demask {stats.demask_seconds:.2f} s")
    parts.append(f"NAR {stats.nar_seconds:.2f} s")
    return ", ".join(parts)


def register(app: typer.Typer) -> None:
    app.command("sample", help=HELP + "\n" + sampler_flags_help(), no_args_is_help=True,
                short_help="Text + a voice prompt -> codes (.npz) with a trained model.",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)
