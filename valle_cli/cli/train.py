"""valle train: shards -> a run folder of checkpoints, logs and curves."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from valle_cli.cli.options import Device, Log, Overwrite, Quiet, Verbose, console

HELP = """Example: valle train shards/ -o run/ --arch llama --preset small --max-steps 20000

Train one codec language model for every task of VALL-E: AR (level 0, causal, with a stop token),
NAR (levels 1..K-1 from the levels below) and NAR-len (level 0 by masked prediction, plus a
duration head). --arch picks the backbone: transformer (our own: RMSNorm, SwiGLU, GQA, RoPE,
optional QK-norm / NoPE / chunked attention / MoE), llama or mixtral (Hugging Face, built from a
config: no download). --preset tiny|small|base|full sets the size; --config run.toml ([model],
[tasks], [train] tables) and --set field=value override single fields; flags win over both.

The run folder gets config.json (the resolved config), log.jsonl, curves.png, and
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


class Schedule(str, Enum):
    cosine = "cosine"
    hold = "hold"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


Shards = Annotated[Path | None, typer.Argument(help="A shards folder (valle shard).", show_default=False)]
Out = Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, logs, curves).")]


def command(
    shards: Shards = None,
    out: Out = Path("run"),
    arch: Annotated[Arch | None, typer.Option(help="Backbone (default transformer).")] = None,
    preset: Annotated[Preset, typer.Option(help="Model size.")] = Preset.small,
    config: Annotated[Path | None, typer.Option("--config", help="TOML with [model] [tasks] [train] tables.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="field=value of the model, tasks or train "
                                                   "config, e.g. --set n_layers=8 (repeatable).")] = None,
    task: Annotated[Task | None, typer.Option(help="tts, or continuation: audio windows without text "
                                              "(continuation and in-fill; valle shard --no-text).")] = None,
    chunks: Annotated[Path | None, typer.Option(help="Continuation: draw windows by the priority of these chunk "
                                                "scores (valle score-chunks).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps in all (default 1000).")] = None,
    batch_tokens: Annotated[int | None, typer.Option(help="Padded tokens per micro-batch per device.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    schedule: Annotated[Schedule | None, typer.Option(help="After warmup: cosine decay or hold.")] = None,
    clip: Annotated[float | None, typer.Option(help="Gradient norm clipping (0 = off).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate on the validation split every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Save a checkpoint every N steps.")] = None,
    keep_last: Annotated[int | None, typer.Option(help="Checkpoints kept (plus the best; 0 = all).")] = None,
    log_every: Annotated[int | None, typer.Option(help="Write a log line every N steps.")] = None,
    precision: Annotated[Precision | None, typer.Option(help="bf16 autocast on GPU (auto) or fp32.")] = None,
    attention: Annotated[Attention | None, typer.Option(help="Attention kernel.")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations "
                                                "in the backward pass (less memory).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    init_from: Annotated[Path | None, typer.Option(help="Start from these weights (checkpoint or run).")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="Train LoRA adapters of this rank only.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA scale numerator (scale = alpha / rank).")] = None,
    merge_lora: Annotated[Path | None, typer.Option(help="Fold a LoRA checkpoint's adapters into its weights, "
                                                    "write a plain checkpoint to --out, and stop.")] = None,
    overwrite: Overwrite = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of weights, batches and tasks.")] = None,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    Log.configure(quiet, verbose)
    from valle_cli.errors import InputError

    if merge_lora is not None:
        from valle_cli.model.load import merge_lora_checkpoint

        path = merge_lora_checkpoint(merge_lora, out, overwrite=overwrite)
        Log.info(f"merged the LoRA adapters of {merge_lora} -> {path}")
        return
    if shards is None:
        raise InputError("missing SHARDS: the shards folder to train on (valle shard codes/ ph.parquet -o shards/)")

    model_cfg, task_cfg, train_cfg = resolve_configs(
        preset.value, config, set_ or [],
        model={"arch": arch.value if arch else None, "attention": attention.value if attention else None,
               "gradient_checkpointing": True if checkpointing else None},
        train={"max_steps": max_steps, "batch_tokens": batch_tokens, "grad_accum": grad_accum, "lr": lr,
               "warmup_steps": warmup_steps, "schedule": schedule.value if schedule else None, "clip": clip,
               "eval_every": eval_every, "save_every": save_every, "keep_last": keep_last, "log_every": log_every,
               "precision": precision.value if precision else None, "compile": True if compile_ else None,
               "lora_rank": lora_rank, "lora_alpha": lora_alpha, "seed": seed,
               "task": task.value if task else None, "chunks": str(chunks) if chunks else None},
    )
    from valle_cli.training.loop import train

    with step_display(train_cfg.max_steps, train_cfg.log_every) as on_step:
        report = train(shards, out, model_cfg, task_cfg, train_cfg, device=device, resume=resume,
                       overwrite=overwrite, init_from=init_from, on_step=on_step)
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


def resolve_configs(preset_name: str, config_file: Path | None, sets: list[str], model: dict[str, Any],
                    train: dict[str, Any]) -> tuple[Any, Any, Any]:
    """preset < --config file < --set < flags, for the model, tasks and train configs."""
    from dataclasses import fields

    from valle_cli.data.tasks import TaskConfig
    from valle_cli.errors import InputError
    from valle_cli.model.config import PRESETS, ModelConfig
    from valle_cli.training.loop import TrainConfig

    layers: dict[str, dict[str, Any]] = {"model": dict(PRESETS[preset_name]), "tasks": {}, "train": {}}
    if config_file is not None:
        for table, values in read_toml(config_file).items():
            if table not in layers or not isinstance(values, dict):
                raise InputError(f"{config_file}: unknown table [{table}] (expected [model], [tasks], [train])")
            if table == "model" and "preset" in values:
                layers["model"] = {**PRESETS[values.pop("preset")], **layers["model"]}
            layers[table].update(values)
    owners = {"model": ModelConfig, "tasks": TaskConfig, "train": TrainConfig}
    names = {table: {f.name: f for f in fields(cls)} for table, cls in owners.items()}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        table = next((t for t in ("model", "tasks", "train") if key in names[t]), None)
        if not sep or table is None:
            raise InputError(f"--set {item!r}: expected field=value with a field of the model, tasks or train config")
        layers[table][key] = parse_value(raw.strip(), owners[table], key)
    layers["model"].update({k: v for k, v in model.items() if v is not None})
    layers["train"].update({k: v for k, v in train.items() if v is not None})
    try:
        model_cfg = ModelConfig.from_dict(layers["model"])
        task_cfg = TaskConfig.from_dict(layers["tasks"])
        train_cfg = TrainConfig.from_dict(layers["train"])
    except TypeError as e:
        raise InputError(f"config: {e}") from None
    return model_cfg, task_cfg, train_cfg


def parse_value(raw: str, owner: Any, key: str) -> Any:
    """A --set value, parsed as the field's default is typed (bool, int, float, str, list)."""
    import json
    from dataclasses import MISSING, fields

    from valle_cli.errors import InputError

    default = next(f.default for f in fields(owner) if f.name == key)
    if default is MISSING:
        return raw
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return json.loads(raw) if raw.startswith("[") else [v.strip() for v in raw.split(",")]
        if raw.startswith("["):  # e.g. tasks.levels as explicit probabilities
            return json.loads(raw)
        return raw
    except (ValueError, json.JSONDecodeError):
        raise InputError(f"--set {key}={raw}: expected a {type(default).__name__}") from None


def read_toml(path: Path) -> dict[str, Any]:
    from valle_cli.errors import InputError

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None


class step_display:
    """A progress bar with loss and tokens/s on a terminal; a plain line every log_every steps otherwise."""

    def __init__(self, max_steps: int, log_every: int):
        self.max_steps, self.log_every = max_steps, max(log_every, 1)
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> Any:
        if Log.level >= 1 and console.is_terminal and not os.environ.get("VALLE_NO_PROGRESS"):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.max_steps, info="")
        return self.on_step

    def on_step(self, info: dict[str, Any]) -> None:
        text = f"loss {info['loss']:.3f}  {info['tokens_per_s']:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=info["step"], info=text)
        elif info["step"] % self.log_every == 0 or info["step"] == info["max_steps"]:
            Log.info(f"step {info['step']}/{info['max_steps']}  {text}")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP, short_help="Shards -> a trained codec LM (checkpoints, logs, curves).",
                no_args_is_help=True)(command)
