"""The run configuration: ``TrainConfig``, and the three configs of a run resolved from their layers.

    model, tasks, train = resolve_config("small", Path("run.toml"), ["n_layers=8"], model={...}, train={...})

Layers, each overriding the one before: the model preset < a TOML file ([model], [tasks], [train]
tables; ``[model] preset = "base"`` picks another preset) < ``--set field=value`` < command-line
flags. An MoE backbone chosen without expert counts gets the preset's (``model.config.MOE_PRESETS``).
The file's [sample] table is not a config of training: the generation settings saved with every
checkpoint (``read_sampling``).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from valle_cli.common import config_from_dict, config_to_dict
from valle_cli.errors import InputError

TABLES = ("model", "tasks", "train")
SAMPLE_TABLE = "sample"  # generation settings saved with every checkpoint: valle sample's defaults
DEFAULT_PRESET = "small"


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    batch_tokens: int = 8000  # padded tokens of one micro-batch on one device
    max_batch_size: int = 0  # cap on utterances per micro-batch (0 = the budget decides)
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine (down to min_lr_ratio * lr at max_steps) | hold
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # gradient norm clipping (0 = off)
    len_loss_weight: float = 0.1
    align_loss_weight: float = 0.0  # guided attention (model/guided_attention.py): 0 = off
    align_width: float = 0.2  # its diagonal band g, in fractions of the text and speech lengths
    align_layer: int = -1  # the guided layer (-1 = n_layers // 2)
    align_heads: int = 1  # heads 0..align_heads-1 of that layer are guided
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 (a CPU too) | fp32
    compile: bool = False
    nan_patience: int = 5  # stop after this many non-finite steps in a row
    n_buckets: int = 16
    weighted: bool = True  # sample by the index's weight column (when it is not all 1)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen model
    lora_alpha: float = 16.0
    task: str = "tts"  # tts (text + prompt -> speech) | continuation (audio windows without text)
    window_seconds: float = 10.0  # continuation: window length
    windows_per_batch: int = 8  # continuation: windows per micro-batch per device
    infill_p: float = 0.3  # continuation: share of windows trained as in-fill (prefix, suffix -> middle)
    chunks: str = ""  # continuation: a score-chunks parquet; windows are drawn by chunk priority (else uniform)

    def __post_init__(self) -> None:
        problems = []
        if self.max_steps < 1 or self.grad_accum < 1 or self.batch_tokens < 1:
            problems.append("max_steps, grad_accum and batch_tokens must be >= 1")
        if self.schedule not in ("cosine", "hold"):
            problems.append(f"schedule {self.schedule!r} (expected cosine or hold)")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision {self.precision!r} (expected auto, bf16 or fp32)")
        if self.lr <= 0:
            problems.append(f"lr {self.lr} must be > 0")
        if self.task not in ("tts", "continuation"):
            problems.append(f"task {self.task!r} (expected tts or continuation)")
        if self.align_loss_weight < 0 or self.align_width <= 0 or self.align_heads < 1:
            problems.append("align_loss_weight >= 0, align_width > 0 and align_heads >= 1 are needed")
        if self.window_seconds <= 0 or self.windows_per_batch < 1 or not 0 <= self.infill_p <= 1:
            problems.append("window_seconds > 0, windows_per_batch >= 1 and 0 <= infill_p <= 1 are needed")
        if problems:
            raise InputError("train config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data, "train")


def resolve_config(preset: str | None = None, config_file: Path | None = None, sets: list[str] | tuple[str, ...] = (),
                   model: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """(ModelConfig, TaskConfig, TrainConfig): preset < ``config_file`` < ``sets`` (field=value) < flags.

    ``preset`` (the --preset flag) wins over the file's ``[model] preset``; without either it is
    DEFAULT_PRESET. ``model`` and ``train`` hold the other flags; None means the flag was not given."""
    from valle_cli.data.tasks import TaskConfig
    from valle_cli.model.config import PRESETS, ModelConfig, with_moe_defaults

    owners = {"model": ModelConfig, "tasks": TaskConfig, "train": TrainConfig}
    if preset is not None and preset not in PRESETS:
        raise InputError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    layers: dict[str, dict[str, Any]] = {"model": {}, "tasks": {}, "train": {}}
    file_preset = read_config_file(config_file, layers) if config_file is not None else None
    preset = preset or file_preset or DEFAULT_PRESET
    for item in sets:
        table, key, value = parse_setting(item, owners)
        layers[table][key] = value
    layers["model"].update({k: v for k, v in (model or {}).items() if v is not None})
    layers["train"].update({k: v for k, v in (train or {}).items() if v is not None})
    model_fields = with_moe_defaults(preset, {**PRESETS[preset], **layers["model"]})
    try:
        return (ModelConfig.from_dict(model_fields), TaskConfig.from_dict(layers["tasks"]),
                TrainConfig.from_dict(layers["train"]))
    except TypeError as e:
        raise InputError(f"config: {e}") from None


def read_config_file(path: Path, layers: dict[str, dict[str, Any]]) -> str | None:
    """Add the [model] [tasks] [train] tables of a TOML file to ``layers``; returns its [model] preset, if any."""
    from valle_cli.model.config import PRESETS

    preset = None
    for table, values in read_toml(path).items():
        if table == SAMPLE_TABLE:
            continue  # read_sampling: generation settings, not a config of training
        if table not in layers or not isinstance(values, dict):
            raise InputError(f"{path}: unknown table [{table}] (expected [model], [tasks], [train], [sample])")
        if table == "model" and "preset" in values:
            values = dict(values)
            preset = str(values.pop("preset"))
            if preset not in PRESETS:
                raise InputError(f"{path}: [model] preset {preset!r}: expected one of {', '.join(PRESETS)}")
        layers[table].update(values)
    return preset


def read_sampling(path: Path | None) -> dict[str, Any]:
    """The [sample] table of a run's TOML file, checked (``valle_cli.generation.params.check_settings``):
    the generation settings the recipe found best (``mode = "ar+nar"``, ``ar_temperature = 0.8``, ...),
    saved in the run config and every checkpoint, so that a plain ``valle sample`` uses them."""
    from valle_cli.generation.params import check_settings

    if path is None:
        return {}
    table = read_toml(path).get(SAMPLE_TABLE, {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: [{SAMPLE_TABLE}] must be a table of settings")
    return check_settings(table, f"{path} [{SAMPLE_TABLE}]")


def parse_setting(item: str, owners: dict[str, Any]) -> tuple[str, str, Any]:
    """``field=value`` -> (the table that owns the field, field, value parsed as the field is typed)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    table = next((t for t in TABLES if key in {f.name for f in fields(owners[t])}), None)
    if not sep or table is None:
        raise InputError(f"--set {item!r}: expected field=value with a field of the model, tasks or train config")
    return table, key, parse_value(raw.strip(), owners[table], key)


def parse_value(raw: str, owner: Any, key: str) -> Any:
    """A --set value, parsed as the field's default is typed (bool, int, float, str, list)."""
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
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
