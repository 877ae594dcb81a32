"""valle train: shards -> a run folder of checkpoints, logs and curves."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Verbose, progress, progress_shown
from valle_cli.errors import InputError
from valle_cli.model.config import ModelConfig
from valle_cli.training.config import DEFAULT_PRESET, TrainConfig, read_sampling, resolve_config

HELP = """Example: valle train shards/ -o run/ --arch llama --preset small --max-steps 20000

Train one codec language model for every task of VALL-E: AR (level 0, causal, with a stop token),
NAR (levels 1..K-1 from the levels below) and NAR-len (level 0 by masked prediction, plus a
duration head). --arch picks the backbone: transformer (our own: RMSNorm, SwiGLU, GQA, RoPE,
optional QK-norm / NoPE / chunked attention / MoE), llama or mixtral (Hugging Face, built from a
config: no download; mixtral routes to the top 2 of 4 experts at --preset tiny, of 8 above, unless
--set moe_experts / moe_top_k say otherwise). --preset tiny|small|base|full sets the size;
--config run.toml ([model], [tasks], [train] tables) and --set field=value override single
fields; flags win over both. A [sample] table (mode = "ar+nar", ar_temperature = 0.8, ...: the
names of valle sample's flags) is saved with every checkpoint as valle sample's defaults.

The run folder gets config.json (the resolved config), log.jsonl, curves.png, TensorBoard events
(tensorboard --logdir run/: the logged scalars, and an audio sample at every evaluation) and
checkpoints/step-N/ (model.safetensors + config.json + train_state/), the last --keep-last kept
plus the best by validation loss (named in run/best). --resume continues a run exactly where its
last checkpoint left it (same batches, same losses); --init-from CKPT starts from other weights;
--lora-rank R trains LoRA adapters on a frozen model (--merge-lora CKPT -o OUT folds them in).
--task continuation trains on audio windows without text (drawn by --chunks priority): each
window is a continuation (the past predicts the rest) or an in-fill (prefix + suffix predict the
middle); sample them with valle sample --continue-seconds / --infill-suffix.
Ctrl-C saves a checkpoint first. Several GPUs or nodes:
  torchrun --nproc_per_node 8 -m valle_cli train shards/ -o run/ ...
"""


class Task(str, Enum):
    tts = "tts"
    continuation = "continuation"


class Arch(str, Enum):
    transformer = "transformer"
    llama = "llama"
    mixtral = "mixtral"


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"
    full = "full"


class Attention(str, Enum):
    auto = "auto"
    sdpa = "sdpa"
    flash = "flash"
    math = "math"
    flex = "flex"


class Schedule(str, Enum):
    cosine = "cosine"
    hold = "hold"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


T = TrainConfig()  # the defaults --help shows; an option left unset lets --config / --set decide


def flag(kind: Any, help: str, default: Any = None, *names: str) -> Any:
    """An option that is None unless given (so the layers below it decide), showing the default that applies."""
    shown = default.value if isinstance(default, Enum) else default
    # in the help text: a show_default string would print as "[default: (1000)]"
    option = typer.Option(*names, help=help if shown is None else f"{help} [default: {shown}]", show_default=False)
    return Annotated[kind | None, option]


Shards = Annotated[Path | None, typer.Argument(help="A shards folder (valle shard).", show_default=False)]
Out = Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, logs, curves).")]
ArchFlag = flag(Arch, "Backbone.", ModelConfig.arch)
PresetFlag = flag(Preset, "Model size (mixtral: with MoE sizes to match).", DEFAULT_PRESET)
ConfigFile = flag(Path, "TOML with [model] [tasks] [train] tables.", None, "--config")
Sets = flag(list[str], "field=value of the model, tasks or train config, e.g. --set n_layers=8 (repeatable).",
            None, "--set")
TaskFlag = flag(Task, "tts, or continuation: audio windows without text (continuation and in-fill; valle shard "
                "--no-text).", T.task)
Chunks = flag(Path, "Continuation: draw windows by the priority of these chunk scores (valle score-chunks).")
MaxSteps = flag(int, "Optimizer steps in all.", T.max_steps)
BatchTokens = flag(int, "Padded tokens per micro-batch per device.", T.batch_tokens)
GradAccum = flag(int, "Micro-batches per optimizer step.", T.grad_accum)
LearningRate = flag(float, "Peak learning rate (AdamW).", T.lr)
WarmupSteps = flag(int, "Linear warmup steps.", T.warmup_steps)
ScheduleFlag = flag(Schedule, "After warmup: cosine decay or hold.", T.schedule)
Clip = flag(float, "Gradient norm clipping (0 = off).", T.clip)
EvalEvery = flag(int, "Evaluate on the validation split every N steps.", T.eval_every)
SaveEvery = flag(int, "Save a checkpoint every N steps.", T.save_every)
KeepLast = flag(int, "Checkpoints kept (plus the best; 0 = all).", T.keep_last)
LogEvery = flag(int, "Write a log line every N steps.", T.log_every)
PrecisionFlag = flag(Precision, "auto: bf16 autocast on a GPU that has it, else fp32; bf16 on a CPU too "
                     "(fast with AVX512-BF16 / AMX).", T.precision)
AttentionFlag = flag(Attention, "Attention kernel.", ModelConfig.attention)
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
Checkpointing = Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the "
                                             "backward pass (less memory).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")]
InitFrom = flag(Path, "Start from these weights (checkpoint or run).")
LoraRank = flag(int, "Train LoRA adapters of this rank only (0 = off).", T.lora_rank)
LoraAlpha = flag(float, "LoRA scale numerator (scale = alpha / rank).", T.lora_alpha)
MergeLora = flag(Path, "Fold a LoRA checkpoint's adapters into its weights, write a plain checkpoint to --out, "
                 "and stop.")
Seed = flag(int, "Seed of weights, batches and tasks.", T.seed, "--seed")


def command(
    shards: Shards = None, out: Out = Path("run"), arch: ArchFlag = None, preset: PresetFlag = None,
    config: ConfigFile = None, set_: Sets = None, task: TaskFlag = None, chunks: Chunks = None,
    max_steps: MaxSteps = None, batch_tokens: BatchTokens = None, grad_accum: GradAccum = None,
    lr: LearningRate = None, warmup_steps: WarmupSteps = None, schedule: ScheduleFlag = None, clip: Clip = None,
    eval_every: EvalEvery = None, save_every: SaveEvery = None, keep_last: KeepLast = None,
    log_every: LogEvery = None, precision: PrecisionFlag = None, attention: AttentionFlag = None,
    compile_: Compile = False, checkpointing: Checkpointing = False, resume: Resume = False,
    init_from: InitFrom = None, lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None,
    merge_lora: MergeLora = None, overwrite: Overwrite = False, seed: Seed = None, device: Device = "auto",
    quiet: Quiet = False, verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    from valle_cli.common import refuse_output_over_input

    # --overwrite clears the run folder's checkpoints and --merge-lora replaces -o whole: no input may lie in it
    refuse_output_over_input(out, [merge_lora, init_from], inside=True)
    refuse_output_over_input(out, [shards, config, chunks])
    if merge_lora is not None:
        from valle_cli.model.load import merge_lora_checkpoint

        path = merge_lora_checkpoint(merge_lora, out, overwrite=overwrite)
        Log.info(f"merged the LoRA adapters of {merge_lora} -> {path}")
        return
    if shards is None:
        raise InputError("missing SHARDS: the shards folder to train on (valle shard codes/ ph.parquet -o shards/)")
    model_cfg, task_cfg, train_cfg = resolve_config(
        value(preset), config, set_ or [],
        model={"arch": value(arch), "attention": value(attention),
               "gradient_checkpointing": True if checkpointing else None},
        train={"max_steps": max_steps, "batch_tokens": batch_tokens, "grad_accum": grad_accum, "lr": lr,
               "warmup_steps": warmup_steps, "schedule": value(schedule), "clip": clip, "eval_every": eval_every,
               "save_every": save_every, "keep_last": keep_last, "log_every": log_every,
               "precision": value(precision), "compile": True if compile_ else None, "lora_rank": lora_rank,
               "lora_alpha": lora_alpha, "seed": seed, "task": value(task), "chunks": str(chunks) if chunks else None},
    )
    from valle_cli.training.loop import train

    sampling = read_sampling(config)
    with step_display(train_cfg.max_steps, train_cfg.log_every) as on_step:
        report = train(shards, out, model_cfg, task_cfg, train_cfg, device=device, resume=resume,
                       overwrite=overwrite, init_from=init_from, on_step=on_step, sampling=sampling)
    log_report(report, out)


def value(choice: Enum | None) -> Any:
    """An enum option's value, or None when it was not given."""
    return choice.value if choice is not None else None


def log_report(report: Any, out: Path) -> None:
    if report.steps == report.start_step:
        Log.info(f"{out}: already trained to step {report.steps} (raise --max-steps to go on)")
        return
    params = report.parameters.get("total", 0)
    best = f", best val loss {report.best_val_loss:.3f}" if report.best_val_loss is not None else ""
    skipped = f", {report.skipped_steps} non-finite step(s) skipped" if report.skipped_steps else ""
    Log.info(f"trained {params / 1e6:.2f}M parameters for steps {report.start_step}..{report.steps}: loss "
             f"{report.first_loss:.3f} -> {report.last_loss:.3f}{best}, {report.tokens_per_second:,.0f} tokens/s"
             f"{skipped} in {report.wall_seconds:.0f} s")
    if report.checkpoints:
        Log.info(f"checkpoint: {report.checkpoints[-1]}")


@contextmanager
def step_display(max_steps: int, log_every: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """train's on_step: the progress bar with loss and tokens/s, or a plain line every log_every steps
    where no bar is drawn (not a terminal)."""
    shown = progress_shown()
    with progress("train", total=max_steps) as advance:
        done = 0

        def on_step(info: dict[str, Any]) -> None:
            nonlocal done
            loss = info["loss"]  # of the last logged step (nan before the first log step)
            text = (f"loss {loss:.3f}  " if not math.isnan(loss) else "") + f"{info['tokens_per_s']:,.0f} tok/s"
            advance(info["step"] - done, info=text)
            done = info["step"]
            if not shown and (info["step"] % max(log_every, 1) == 0 or info["step"] == info["max_steps"]):
                Log.info(f"step {info['step']}/{info['max_steps']}  {text}")

        yield on_step


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP, short_help="Shards -> a trained codec LM (checkpoints, logs, curves).",
                no_args_is_help=True)(command)
