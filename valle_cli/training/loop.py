"""``valle train``: the training loop, readable top to bottom.

    train(shards, out, model_config, task_config, train_config) -> TrainReport

1. Open the shards (train and val splits) and fill the data fields of the model config (K,
   codebook size, text vocabulary) from them.
2. Build the model (``CodecLM`` over the chosen backbone), optionally from ``init_from`` weights,
   optionally with LoRA adapters (then only the adapters train). AdamW (no decay on norms,
   biases and embeddings), linear warmup then cosine decay or a constant hold.
3. Batches: a token-budget sampler over duration buckets (``sampler.py``; weighted by the index's
   ``weight`` column when chunk scores gave one), tasks drawn per utterance (``tasks.py``) from a
   generator seeded by (seed, step, micro-step, rank), prepared by a background thread.
4. Each step: ``grad_accum`` micro-batches (bf16 autocast on GPU, fp32 on CPU), a NaN/inf guard
   (skip the step; stop after ``nan_patience`` in a row), clipping, the optimizer step.
5. Every ``log_every`` steps a JSONL line (loss and top-1 accuracy per task, tokens/s); every
   ``eval_every`` the validation split; every ``save_every`` (and at the end, and on Ctrl-C) a
   checkpoint with the whole train state (``checkpoint.py``).

``task="continuation"`` trains the same model on windows of audio without text (seed 003): windows
drawn by chunk priority, each a continuation (past -> future) or an in-fill (prefix + suffix ->
middle) example.

Resume restores weights, optimizer, scheduler, sampler position and torch RNG: the resumed run
produces the same losses as an uninterrupted one. Several devices: ``torchrun --nproc_per_node N
-m valle_cli train ...`` (DDP; every rank reads distinct batches; rank 0 logs and saves).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import checkpoint as ckpt
from valle_cli.common import config_from_dict, config_to_dict
from valle_cli.data import tasks
from valle_cli.errors import InputError, ValleError
from valle_cli.model.config import ModelConfig, override

RUN_CONFIG = "config.json"
LOG_FILE = "log.jsonl"
CURVES_FILE = "curves.png"


class TrainingError(ValleError):
    """Training cannot go on (diverged, nothing to train on, a run folder in the way)."""


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
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp32
    compile: bool = False
    nan_patience: int = 5  # stop after this many non-finite steps in a row
    n_buckets: int = 16
    weighted: bool = True  # sample by the index's weight column (when it is not all 1)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen model
    lora_alpha: float = 16.0
    task: str = "tts"  # tts (text + prompt -> speech) | continuation (audio windows, no text; seed 003)
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
        if self.window_seconds <= 0 or self.windows_per_batch < 1 or not 0 <= self.infill_p <= 1:
            problems.append("window_seconds > 0, windows_per_batch >= 1 and 0 <= infill_p <= 1 are needed")
        if problems:
            raise InputError("train config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data, "train")


@dataclass
class TrainReport:
    out: Path
    steps: int = 0
    start_step: int = 0
    last_loss: float = float("nan")
    first_loss: float = float("nan")
    best_val_loss: float | None = None
    tokens_per_second: float = 0.0
    wall_seconds: float = 0.0
    checkpoints: list[str] = field(default_factory=list)
    parameters: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0
    interrupted: bool = False


# ----------------------------------------------------------------------------- devices and processes


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(rank=rank, world_size=world, local_rank=local)


def rank_device(device: str, dist: Distributed) -> str:
    """Under torchrun every rank takes the GPU of its local rank."""
    if device == "cuda" and dist.world_size > 1:
        return f"cuda:{dist.local_rank}"
    return device


def autocast_dtype(precision: str, device: str) -> Any:
    import torch

    if precision == "fp32" or not device.startswith("cuda"):
        if precision == "bf16" and not device.startswith("cuda"):
            raise InputError("--precision bf16 needs a CUDA device (CPU training runs in fp32)")
        return None
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


# ----------------------------------------------------------------------------- data


def sequence_costs(index: Any, task_config: tasks.TaskConfig, frame_rate: float) -> np.ndarray:
    """(N,) padded-token cost of each utterance for the sampler: text + frames + the longest prompt + specials."""
    prompt = int(math.ceil(task_config.prompt_seconds[1] * frame_rate))
    return (index["text_len"].to_numpy() + index["frames"].to_numpy() + prompt + 3).astype(np.int64)


def make_batch(data: Any, rows: list[int], rng: np.random.Generator, task_config: tasks.TaskConfig,
               model_config: ModelConfig) -> tasks.SequenceBatch:
    """Rows of a ShardSet -> a laid-out batch: prompts from the speaker's other utterances, tasks drawn."""
    records, prompts = [], []
    for row in rows:
        records.append(data.record(row))
        candidates = data.prompt_candidates(row)
        prompts.append(data.record(int(rng.choice(candidates)))[1] if len(candidates) else None)
    examples = tasks.draw_examples(records, prompts, rng, task_config, data.frame_rate, model_config.capabilities)
    return tasks.collate(examples, model_config.codebook_size, model_config.unified_positions)


def window_sampler(data: Any, config: TrainConfig, dist: Distributed, seed_offset: int = 0) -> Any:
    """Continuation windows over a ShardSet split, drawn by chunk priority (``config.chunks``) or uniformly."""
    import polars as pl

    from valle_cli import formats
    from valle_cli.codecs import check_same_codec
    from valle_cli.data.batching import PriorityWindowSampler

    index = data.index
    frames = index["frames"].to_numpy()
    window = max(1, int(round(config.window_seconds * data.frame_rate)))
    if config.chunks:
        df, _ = formats.read_chunk_scores(config.chunks)
        for text in df["codec"].unique().to_list():
            check_same_codec(data.codec, json.loads(text), f"chunk scores {config.chunks}")
        rows = pl.DataFrame({"id": index["id"], "row": np.arange(len(index))})
        df = df.join(rows, on="id", how="inner")
        if df.is_empty():
            raise InputError(f"{config.chunks}: no chunk belongs to an utterance of these shards")
        item, start, length = df["row"].to_numpy(), df["frame_start"].to_numpy(), df["frame_len"].to_numpy()
        priority, void = df["priority"].to_numpy().astype(np.float64), df["void"].to_numpy()
    else:  # one-second chunks of equal priority: uniform windows
        size = max(1, int(round(data.frame_rate)))
        counts = -(-frames // size)
        item = np.repeat(np.arange(len(frames)), counts)
        start = np.concatenate([np.arange(c) * size for c in counts])
        length = np.minimum(size, frames[item] - start)
        priority, void = np.ones(len(item)), None
    return PriorityWindowSampler(item, start, length, np.clip(priority, 0, None), frames, window,
                                 config.windows_per_batch, void=void, placement="random",
                                 seed=config.seed + seed_offset, rank=dist.rank, world_size=dist.world_size)


def make_window_batch(data: Any, windows: list[tuple[int, int, int]], rng: np.random.Generator,
                      task_config: tasks.TaskConfig, train_config: TrainConfig,
                      model_config: ModelConfig) -> tasks.SequenceBatch:
    """(row, start, length) windows of a ShardSet -> a laid-out batch of continuation / in-fill examples."""
    cuts = [np.asarray(data.record(row)[1][:, start:start + length]) for row, start, length in windows]
    examples = tasks.window_examples(cuts, rng, task_config, train_config.infill_p, model_config.capabilities)
    return tasks.collate(examples, model_config.codebook_size, model_config.unified_positions)


class Prefetcher:
    """Prepares the next batches in a background thread (numpy work; the GIL is released in copies).

    Yields (step, micro, batch, sampler state after this batch was handed out), in order.
    """

    def __init__(self, produce: Callable[[], Iterator[Any]], depth: int = 2):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in produce():
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put(e)

    def __next__(self) -> Any:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()


# ----------------------------------------------------------------------------- model, optimizer, schedule


def build_model(model_config: ModelConfig, train_config: TrainConfig, device: str) -> Any:
    import torch

    from valle_cli.model.valle import CodecLM

    with torch.device("cpu"):
        model = CodecLM(model_config, len_loss_weight=train_config.len_loss_weight)
    return model.to(device)


def add_lora(model: Any, train_config: TrainConfig) -> dict[str, Any]:
    """LoRA adapters on the backbone's linears; everything else frozen. Returns the LoRA config dict."""
    from valle_cli.model.lora import LoraConfig, apply_lora

    config = LoraConfig(rank=train_config.lora_rank, alpha=train_config.lora_alpha)
    apply_lora(model.backbone, config)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return config.to_dict()


def build_optimizer(model: Any, config: TrainConfig, device: str) -> Any:
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "_emb" in name or name.startswith(("resp_ar", "resp_mask", "resp_nar"))
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **extra)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of config.lr at optimizer step ``step`` (0-based): linear warmup, then cosine or hold."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "hold":
        return 1.0
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- the run folder


def run_meta(model_config: ModelConfig, task_config: tasks.TaskConfig, train_config: TrainConfig, data: Any,
             lora: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "model": model_config.to_dict(), "tasks": task_config.to_dict(), "train": train_config.to_dict(),
        "codec": data.codec, "tokenizer": data.tokenizer_meta, "text_settings": data.text_settings,
        "frame_rate": data.frame_rate, "sample_rate": data.meta.get("sample_rate"),
        "shards": str(data.folder), "lora": lora,
    }


def find_codec_file(data: Any) -> Path | None:
    """The fitted built-in codec file of the shards' codes (recorded path, or beside the codes), if found."""
    spec = data.codec
    if spec.get("name") != "builtin":
        return None
    from valle_cli.codecs import codec_from_spec

    search = [Path(p) for p in data.meta.get("inputs", {}).get("codes", [])]
    try:  # the same search (and hash check) decode uses; the codec found records where it was loaded from
        return Path(codec_from_spec(spec, search=search).spec["path"])
    except ValleError:
        return None


def prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The saved run config when resuming; refuses to mix two runs in one folder."""
    has_run = (out / RUN_CONFIG).is_file() or bool(ckpt.list_checkpoints(out))
    if resume:
        if not (out / RUN_CONFIG).is_file():
            raise InputError(f"{out}: nothing to resume (no {RUN_CONFIG}); drop --resume to start a run")
        return json.loads((out / RUN_CONFIG).read_text())
    if has_run and not overwrite:
        raise InputError(f"{out}: holds a run already (--resume continues it, --overwrite starts again)")
    if has_run:
        import shutil

        for name in (ckpt.CHECKPOINTS_DIR,):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (RUN_CONFIG, LOG_FILE, CURVES_FILE, ckpt.BEST_FILE):
            (out / name).unlink(missing_ok=True)
    return None


def append_log(out: Path, record: dict[str, Any]) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out: Path, step: int) -> None:
    """Drop log lines past ``step``: a killed run may have logged steps its last checkpoint lacks."""
    path = out / LOG_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_log(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(out) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out: Path) -> Path | None:
    """curves.png: training loss per task (and validation loss), top-1 accuracy per task, by step."""
    records = read_log(out)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from valle_cli.formats import atomic_path

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for split, style in (("train", "-"), ("val", "o--")):
        rows = [r for r in records if r.get("split") == split]
        names = sorted({name for r in rows for name in r.get("tasks", {})})
        for name in names:
            points = [(r["step"], r["tasks"][name]) for r in rows if name in r.get("tasks", {})]
            steps = [s for s, _ in points]
            ax_loss.plot(steps, [t["loss"] for _, t in points], style, label=f"{split} {name}", markersize=3)
            ax_acc.plot(steps, [t["acc"] for _, t in points], style, label=f"{split} {name}", markersize=3)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss per task", yscale="log")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy per task")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / CURVES_FILE
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- metrics


class TaskMeter:
    """Sums of (loss, tokens, correct) per task; read on the host only when logging."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Any]] = {}

    def add(self, stats: dict[str, tuple[Any, float, Any]]) -> None:
        for name, (loss, count, correct) in stats.items():
            acc = self.sums.setdefault(name, [0.0, 0.0, 0.0])
            acc[0], acc[1], acc[2] = acc[0] + loss, acc[1] + count, acc[2] + correct

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (loss, count, correct) in sorted(self.sums.items()):
            count = max(float(count), 1.0)
            out[name] = {"loss": float(loss) / count, "acc": float(correct) / count, "tokens": int(count)}
        return out


def validate(model: Any, data: Any, task_config: tasks.TaskConfig, model_config: ModelConfig,
             train_config: TrainConfig, device: str, dtype: Any) -> dict[str, Any] | None:
    """Loss and accuracy per task on the validation split: the same batches and tasks at every evaluation."""
    import torch

    from valle_cli.data.batching import TokenBudgetBatchSampler
    from valle_cli.model.valle import Batch

    if len(data) == 0:
        return None
    if train_config.task == "continuation":
        sampler: Any = iter(window_sampler(data, replace(train_config, chunks=""), Distributed(), seed_offset=1))

        def lay_out(rows: Any, rng: np.random.Generator) -> tasks.SequenceBatch:
            return make_window_batch(data, rows, rng, task_config, train_config, model_config)
    else:
        costs = sequence_costs(data.index, task_config, data.frame_rate)
        sampler = TokenBudgetBatchSampler(costs, max(train_config.batch_tokens, int(costs.max())), shuffle=False,
                                          n_buckets=train_config.n_buckets, seed=train_config.seed)

        def lay_out(rows: Any, rng: np.random.Generator) -> tasks.SequenceBatch:
            return make_batch(data, rows, rng, task_config, model_config)
    meter, total, tokens = TaskMeter(), 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, rows in zip(range(train_config.eval_batches), sampler, strict=False):
            rng = np.random.default_rng([train_config.seed, 2**31 - 1, i])
            batch = Batch.from_numpy(lay_out(rows, rng), device)
            with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(batch)
            meter.add(out.stats)
            n = sum(count for name, (_, count, _) in out.stats.items() if name != "len")
            total += sum(float(loss) for name, (loss, _, _) in out.stats.items() if name != "len")
            tokens += int(n)
    model.train(was_training)
    return {"loss": total / max(tokens, 1), "tasks": meter.summary()}


# ----------------------------------------------------------------------------- the loop


def train(shards: str | os.PathLike[str], out: str | os.PathLike[str], model_config: ModelConfig,
          task_config: tasks.TaskConfig = tasks.TaskConfig(), train_config: TrainConfig = TrainConfig(),
          device: str = "auto", resume: bool = False, overwrite: bool = False,
          init_from: str | os.PathLike[str] | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainReport:
    """Train a CodecLM on a ``valle shard`` folder; checkpoints and logs go to the run folder ``out``.

    ``on_step`` receives a small dict after every optimizer step (step, loss, lr, tokens/s) for
    progress display. With ``resume`` the saved run config wins over the arguments, except
    ``train_config.max_steps`` (a run can be extended).
    """
    import torch

    from valle_cli.common import resolve_device
    from valle_cli.data.batching import TokenBudgetBatchSampler
    from valle_cli.data.shards import ShardSet
    from valle_cli.model.valle import Batch, count_parameters

    start_time = time.perf_counter()
    out = Path(out)
    device = resolve_device(device)
    dist = setup_distributed(device)
    device = rank_device(device, dist)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)

    saved = prepare_run_folder(out, resume, overwrite) if dist.main else None
    if dist.world_size > 1:  # every rank needs the saved config; it is on a shared disk
        torch.distributed.barrier()
        if resume:
            saved = json.loads((out / RUN_CONFIG).read_text())
    if saved is not None:
        model_config = ModelConfig.from_dict(saved["model"])
        task_config = tasks.TaskConfig.from_dict(saved["tasks"])
        train_config = replace(TrainConfig.from_dict(saved["train"]), max_steps=train_config.max_steps)

    # 1. data
    data = ShardSet(shards)
    train_data, val_data = data.select("train"), data.select("val")
    if len(train_data) == 0:
        raise TrainingError(f"{shards}: no training utterances (all of them are in the validation split)")
    model_config = override(model_config, n_codebooks=data.n_codebooks, codebook_size=data.codebook_size,
                            text_vocab_size=data.text_vocab_size)
    if train_config.task == "continuation":
        sampler: Any = window_sampler(train_data, train_config, dist)
    else:
        costs = sequence_costs(train_data.index, task_config, data.frame_rate)
        weights = train_data.index["weight"].to_numpy()
        use_weights = train_config.weighted and not np.allclose(weights, 1.0)
        sampler = TokenBudgetBatchSampler(
            costs, train_config.batch_tokens, weights=weights if use_weights else None,
            n_buckets=train_config.n_buckets, max_batch_size=train_config.max_batch_size or None,
            seed=train_config.seed, rank=dist.rank, world_size=dist.world_size, oversize="single",
        )

    # 2. model and optimizer
    torch.manual_seed(train_config.seed)
    model = build_model(model_config, train_config, device)
    if init_from is not None and saved is None:
        source = ckpt.resolve_checkpoint(init_from)
        load_into(model, ckpt.load_weights(source), str(source))
    lora = add_lora(model, train_config) if train_config.lora_rank > 0 else None  # resuming: lora_rank is saved
    optimizer = build_optimizer(model, train_config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_config))
    meta = run_meta(model_config, task_config, train_config, data, lora)
    codec_file = find_codec_file(data)
    report = TrainReport(out=out, parameters=count_parameters(model))

    step, best, nan_streak = 0, None, 0
    if resume:
        last = ckpt.resolve_checkpoint(out)
        state, optimizer_tensors = ckpt.load_state(last)
        load_into(model, ckpt.load_weights(last), str(last))
        optimizer.load_state_dict(ckpt.optimizer_from_safetensors(optimizer_tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"][dist.rank] if dist.rank < len(state["sampler"]) else {})
        torch.set_rng_state(torch.tensor(state["torch_rng"][dist.rank], dtype=torch.uint8))
        step, best, nan_streak = int(state["step"]), state.get("best_val_loss"), int(state.get("nan_streak", 0))
        if dist.main:
            truncate_log(out, step)
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    report.start_step = step
    report.best_val_loss = best
    if step >= train_config.max_steps:
        report.steps = step
        return report

    dtype = autocast_dtype(train_config.precision, device)
    train_model = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None,
                                              find_unused_parameters=True)
    if train_config.compile:
        # Only the backbone: the embeddings and heads branch on which tasks a batch holds, and a
        # compiled whole model would recompile for every new combination. Compiling the forward
        # method (not wrapping the module) keeps the parameter names, so checkpoints do not change.
        model.backbone.forward = torch.compile(model.backbone.forward, dynamic=True)

    def produce() -> Iterator[Any]:
        batches = sampler.batches()
        s = step
        while True:
            for micro in range(train_config.grad_accum):
                rows = next(batches)
                state = sampler.state_dict()
                rng = np.random.default_rng([train_config.seed, s, micro, dist.rank])
                if train_config.task == "continuation":
                    laid_out = make_window_batch(train_data, rows, rng, task_config, train_config, model_config)
                else:
                    laid_out = make_batch(train_data, rows, rng, task_config, model_config)
                yield s, micro, laid_out, state
            s += 1

    def save(at_step: int, sampler_state: dict[str, Any]) -> Path:
        states = gather(sampler_state, dist)
        rngs = gather(torch.get_rng_state().tolist(), dist)
        if not dist.main:
            return out
        tensors, rest = ckpt.optimizer_to_safetensors(optimizer.state_dict())
        lora_file = None
        if lora:
            from valle_cli.model.lora import LoraConfig, save_lora

            lora_file = (save_lora, model.backbone, LoraConfig.from_dict(lora), {"step": at_step})
        path = ckpt.save_checkpoint(
            out, at_step, model.state_dict(), {**meta, "best_val_loss": best},
            train_state={"step": at_step, "optimizer": rest, "scheduler": scheduler.state_dict(),
                         "sampler": states, "torch_rng": rngs, "best_val_loss": best, "nan_streak": nan_streak},
            optimizer_tensors=tensors, lora_file=lora_file, keep_last=train_config.keep_last,
            extra_files={"codec.safetensors": codec_file} if codec_file else None,
        )
        report.checkpoints.append(str(path))
        plot_curves(out)
        return path

    loader = Prefetcher(produce)
    meter, window_tokens, window_start, window_losses = TaskMeter(), 0, time.perf_counter(), []
    sampler_state = sampler.state_dict()
    last_saved = step
    train_model.train()
    try:
        while step < train_config.max_steps:
            loss_value, tokens = 0.0, 0
            for micro in range(train_config.grad_accum):
                batch_step, batch_micro, laid_out, sampler_state = next(loader)
                assert (batch_step, batch_micro) == (step, micro), (batch_step, batch_micro, step, micro)
                batch = Batch.from_numpy(laid_out, device)
                sync = micro == train_config.grad_accum - 1 or dist.world_size == 1
                context = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else nullcontext()
                with context, torch.autocast(device.split(":")[0], dtype=dtype or torch.float32,
                                             enabled=dtype is not None):
                    result = train_model(batch)
                    (result.loss / train_config.grad_accum).backward()
                loss_value += float(result.loss.detach()) / train_config.grad_accum
                tokens += batch.tokens
                meter.add(result.stats)
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.clip)
                         if train_config.clip > 0 else _grad_norm(model))
            finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
            if dist.world_size > 1:
                flag = torch.tensor([float(finite)], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                finite = bool(flag.item())
            if finite:
                optimizer.step()
                nan_streak = 0
            else:
                nan_streak += 1
                report.skipped_steps += 1
                if nan_streak >= train_config.nan_patience:
                    raise TrainingError(f"loss or gradients were NaN/inf for {nan_streak} steps in a row (step "
                                        f"{step + 1}); lower --lr or raise --warmup-steps, or resume from an "
                                        "earlier checkpoint")
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped step still counts: the schedule follows the step number
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
            step += 1
            window_tokens += tokens
            window_losses.append(loss_value)
            if math.isnan(report.first_loss):
                report.first_loss = loss_value
            report.last_loss, report.steps = loss_value, step

            if step % train_config.log_every == 0 or step == train_config.max_steps:
                elapsed = time.perf_counter() - window_start
                rate = window_tokens * dist.world_size / max(elapsed, 1e-9)
                finite_losses = [v for v in window_losses if math.isfinite(v)]
                mean_loss = sum(finite_losses) / len(finite_losses) if finite_losses else float("nan")
                record = {"step": step, "split": "train", "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "tokens_per_s": rate, "tasks": meter.summary(),
                          "time": time.time()}
                if dist.main:
                    append_log(out, record)
                report.tokens_per_second = rate
                meter, window_tokens, window_start, window_losses = TaskMeter(), 0, time.perf_counter(), []
            if on_step is not None and dist.main:
                on_step({"step": step, "max_steps": train_config.max_steps, "loss": loss_value,
                         "tokens_per_s": report.tokens_per_second, "skipped": not finite})

            is_best = False
            if step % train_config.eval_every == 0 or step == train_config.max_steps:
                if dist.main:  # rank 0 evaluates; the others wait for its verdict below
                    result = validate(model, val_data, task_config, model_config, train_config, device, dtype)
                    if result is not None:
                        append_log(out, {"step": step, "split": "val", **result, "time": time.time()})
                        is_best = best is None or result["loss"] < best
                        if is_best:
                            best = report.best_val_loss = result["loss"]
                is_best = broadcast_flag(is_best, dist, device)  # saving is collective: every rank must agree
            if step % train_config.save_every == 0 or step == train_config.max_steps or is_best:
                path = save(step, sampler_state)
                last_saved = step
                if is_best and dist.main:
                    ckpt.mark_best(out, path)
    except KeyboardInterrupt:
        report.interrupted = True
        if step > last_saved:  # never lose finished steps
            save(step, sampler_state)
        raise
    finally:
        loader.close()
        report.wall_seconds = time.perf_counter() - start_time
    return report


def broadcast_flag(flag: bool, dist: Distributed, device: str) -> bool:
    """Rank 0's ``flag`` on every rank (itself without DDP)."""
    if dist.world_size == 1:
        return flag
    import torch
    import torch.distributed

    value = torch.tensor([float(flag)], device=device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())


def gather(value: Any, dist: Distributed) -> list[Any]:
    """Every rank's JSON-able ``value``, in rank order (one element without DDP)."""
    if dist.world_size == 1:
        return [value]
    import torch.distributed

    values: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def load_into(model: Any, weights: dict[str, Any], source: str) -> None:
    """Load weights by name; every tensor must be present with the same shape (one clear message if not)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise InputError(f"{source}: weights do not fit this model ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(wrong)} of another shape; first: {first})")
    model.load_state_dict(weights)


def _grad_norm(model: Any) -> Any:
    import torch

    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())

