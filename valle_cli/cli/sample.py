"""valle sample: a checkpoint + text + a voice prompt -> codes (.npz), ready for valle decode."""

from __future__ import annotations

from dataclasses import fields, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Verbose, progress

SAMPLER_FLAGS = {  # flag -> SamplingParams field
    "temperature": "temperature", "top-k": "top_k", "top-p": "top_p", "min-p": "min_p",
    "repetition-penalty": "repetition_penalty", "repetition-window": "repetition_window",
    "repetition-decay": "repetition_decay", "length-penalty": "length_penalty",
    "cfg-strength": "cfg_strength", "cfg-rescale": "cfg_rescale",
}
PASSES = ("ar", "nar", "demask")

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

--mode ar+nar: level 0 autoregressively (KV cache; until the stop token or --max-seconds), then
one NAR pass per further level. --mode nar-len: the duration from the len head (--duration to
force it), then --steps rounds of demasking. auto picks ar+nar when the model has the AR task.

Sampler flags, for every pass or one pass with a prefix (--ar-..., --nar-..., --demask-...):
--temperature (<= 0 greedy; ar 1.0, nar 0, demask 1.0), --top-k, --top-p, --min-p,
--repetition-penalty, --repetition-window, --repetition-decay, --length-penalty (AR stop token),
--cfg-strength (demask default 2.5), --cfg-rescale. Example: --ar-temperature 0.8 --top-k 50
"""


class Mode(str, Enum):
    auto = "auto"
    ar_nar = "ar+nar"
    nar_len = "nar-len"


def command(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder or a run folder (valle train).")],
    out: Annotated[Path, typer.Option("--out", "-o", allow_dash=True, help="Output .npz, - for stdout, or a "
                                      "folder with --manifest.")],
    text: Annotated[str | None, typer.Option(help="What to say (one or more sentences).")] = None,
    prompt: Annotated[list[Path] | None, typer.Option("--prompt", allow_dash=True,
                                                      help="Voice prompt: audio or codes .npz (repeatable).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Batch mode: id|text|prompt rows.")] = None,
    mode: Annotated[Mode, typer.Option(help="Decoding strategy.")] = Mode.auto,
    max_seconds: Annotated[float, typer.Option(help="AR: stop after this much audio.")] = 30.0,
    duration: Annotated[float | None, typer.Option(help="NAR-len: seconds to generate (default: predicted).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="NAR-len demasking rounds.")] = 25,
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
    from valle_cli.common import resolve_device
    from valle_cli.errors import InputError
    from valle_cli.generation.generate import GenerateStats
    from valle_cli.generation.synthesizer import Synthesizer

    config = replace(generate_config(ctx.args, mode.value, max_seconds, steps), compile=compile_)
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
    if manifest is None and str(out) != "-" and out.exists() and not overwrite:
        Log.info(f"{out} exists, skipping (--overwrite to redo)")
        return
    dev = resolve_device(device)
    synth = Synthesizer.load(checkpoint, dev, which="best" if best else "last")
    config = replace(config, max_frames=max(1, int(round(max_seconds * synth.frame_rate))))
    Log.detail(f"checkpoint {synth.folder} (step {synth.meta['step']}, {synth.meta['model']['arch']}, "
               f"{synth.meta['codec'].get('name')})")
    stats = GenerateStats()

    if manifest is not None:
        run_manifest(synth, manifest, out, config, prompt_seconds, lang, batch_size, seed, overwrite, stats)
        return
    prompts: list[Any] = [formats.read_input_bytes("-") if str(p) == "-" else p for p in prompt]
    if audio_only:
        if continue_seconds is not None:
            item = synth.continuation(prompts, continue_seconds, config, rollouts, context_seconds, lang, seed,
                                        stats, chunks=chunks)
        else:
            item = synth.infill(prompts, list(infill_suffix), config, duration, lang, seed, stats)
        formats.write_output_bytes(out, formats.codes_to_bytes(item))
        parts = " + ".join(f"{n / synth.frame_rate:.2f}" for n in item.extra["segments"])
        Log.info(f"{parts} s of codes ({timing(stats)}) -> {formats.display_name(out, output=True)}")
        return
    item = synth.tts(text, prompts, config, prompt_seconds=prompt_seconds, context_history=context_history,
                       lang=lang, duration_seconds=duration, seed=seed, stats=stats)
    formats.write_output_bytes(out, formats.codes_to_bytes(item))
    seconds = item.codes.shape[1] / synth.frame_rate
    segments = f" in {len(item.extra['segments'])} sentences" if "segments" in item.extra else ""
    Log.info(f"{seconds:.2f} s of codes{segments} ({timing(stats)}) -> {formats.display_name(out, output=True)}")


def timing(stats: Any) -> str:
    parts = []
    if stats.ar_frames:
        parts.append(f"AR {stats.ar_frames / max(stats.ar_seconds, 1e-9):,.0f} frames/s")
    if stats.demask_seconds:
        parts.append(f"demask {stats.demask_seconds:.2f} s")
    parts.append(f"NAR {stats.nar_seconds:.2f} s")
    return ", ".join(parts)


def run_manifest(sampler: Any, manifest: Path, out: Path, config: Any, prompt_seconds: float | None, lang: int,
                 batch_size: int, seed: int | None, overwrite: bool, stats: Any) -> None:
    from valle_cli import formats
    from valle_cli.errors import InputError, PartialFailure, ValleError
    from valle_cli.generation.synthesizer import read_sample_manifest, split_sentences

    if str(out) == "-":
        raise InputError("--manifest writes one npz per row: -o must name a folder")
    rows = read_sample_manifest(manifest)
    todo = [r for r in rows if overwrite or not (out / f"{r[0]}.npz").exists()]
    failures: dict[str, str] = {}
    seconds_cut = sampler.default_prompt_seconds() if prompt_seconds is None else prompt_seconds
    with progress("sample", total=len(todo), unit="utt") as advance:
        single = [r for r in todo if len(split_sentences(r[1])) == 1]
        for start in range(0, len(single), batch_size):
            chunk = single[start:start + batch_size]
            ready = []
            for uid, text, prompts in chunk:
                try:
                    ready.append((uid, text, sampler.prompt_codes(prompts, seconds_cut)))
                except ValleError as e:
                    failures[uid] = str(e)
            if ready:
                try:
                    items = sampler.tts_batch([t for _, t, _ in ready], [p for _, _, p in ready], config, lang,
                                              None if seed is None else seed + start, stats)
                    for (uid, _, _), item in zip(ready, items, strict=True):
                        formats.write_codes(out / f"{uid}.npz", item)
                except ValleError as e:
                    failures.update({uid: str(e) for uid, _, _ in ready})
            advance(len(chunk))
        for uid, text, prompts in (r for r in todo if len(split_sentences(r[1])) != 1):
            try:
                item = sampler.tts(text, prompts, config, prompt_seconds=prompt_seconds, lang=lang, seed=seed,
                                   stats=stats)
                formats.write_codes(out / f"{uid}.npz", item)
            except ValleError as e:
                failures[uid] = str(e)
            advance(1)
    done = len(todo) - len(failures)
    Log.info(f"{done} sampled, {len(rows) - len(todo)} already done ({timing(stats)}) -> {out}")
    if failures:
        raise PartialFailure(f"{len(failures)} row(s) of {manifest} failed", failures)


def generate_config(args: list[str], mode: str, max_seconds: float, steps: int) -> Any:
    """GenerateConfig from the sampler flags (``--temperature 0.7``, ``--ar-top-k 50``, ...)."""
    from valle_cli.generation.generate import GenerateConfig, SamplingParams

    config = GenerateConfig(mode=mode, steps=steps)
    types = {f.name: type(f.default) for f in fields(SamplingParams)}
    everywhere: dict[str, Any] = {}
    per_pass: dict[str, dict[str, Any]] = {p: {} for p in PASSES}
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
        target = everywhere
        for p in PASSES:
            if name.startswith(p + "-") and name[len(p) + 1:] in SAMPLER_FLAGS:
                target, name = per_pass[p], name[len(p) + 1:]
                break
        if name not in SAMPLER_FLAGS:
            raise typer.BadParameter(f"no such option: --{name} (see valle sample --help)")
        field = SAMPLER_FLAGS[name]
        try:
            target[field] = types[field](value)
        except ValueError:
            raise typer.BadParameter(f"--{name} {value!r}: expected a {types[field].__name__}") from None
    passes = {p: replace(getattr(config, p), **{**everywhere, **per_pass[p]}) for p in PASSES}
    return replace(config, **passes)


def register(app: typer.Typer) -> None:
    app.command("sample", help=HELP, no_args_is_help=True,
                short_help="Text + a voice prompt -> codes (.npz) with a trained model.",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)
