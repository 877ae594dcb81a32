"""``valle train``: the training loop, readable top to bottom.

    train(shards, out, model_config, task_config, train_config) -> TrainReport

1. Open the shards (train and val splits) and fill the data fields of the model config (K,
   codebook size, text vocabulary) from them.
2. Build the model (``CodecLM`` over the chosen backbone), optionally from ``init_from`` weights,
   optionally with LoRA adapters (then only the adapters train). AdamW (no decay on norms,
   biases and embeddings), linear warmup then cosine decay or a constant hold.
3. Batches: a token-budget sampler over duration buckets (``data/batching.py``; weighted by the
   index's ``weight`` column when chunk scores gave one), tasks drawn per utterance (``data/tasks.py``)
   from a generator seeded by (seed, step, micro-step, rank), prepared by a background thread.
4. Each step: ``grad_accum`` micro-batches (bf16 autocast on GPU, fp32 on CPU unless asked for bf16), a NaN/inf guard
   (skip the step; stop after ``nan_patience`` in a row), clipping, the optimizer step. The loss
   stays on the device: the one host sync of a step is the guard's finite flag; the losses of a
   log window are read at the log step.
5. Every ``log_every`` steps a log.jsonl entry (loss and top-1 accuracy per task, tokens/s) and the
   same scalars in TensorBoard; every ``eval_every`` the validation split and an audio sample; every
   ``save_every`` (and at the end, and on Ctrl-C) a checkpoint with the whole train state
   (``checkpoint.py``).

``task="continuation"`` trains the same model on windows of audio without text: windows drawn by
chunk priority, each a continuation (past -> future) or an in-fill (prefix + suffix -> middle)
example.

Resume restores weights, optimizer, scheduler, sampler position and torch RNG: the resumed run
produces the same losses as an uninterrupted one. Several devices: ``torchrun --nproc_per_node N
-m valle_cli train ...`` (DDP; every rank reads distinct batches; rank 0 logs and saves).
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import checkpoint as ckpt
from valle_cli.data import tasks
from valle_cli.errors import FormatError, InputError, ValleError
from valle_cli.formats import CURVES_FILE, LOG_FILE, append_log, truncate_log
from valle_cli.model.config import ModelConfig, override
from valle_cli.model.load import load_into
from valle_cli.training.config import TrainConfig
from valle_cli.training.curves import plot_curves
from valle_cli.training.tensorboard import EVENTS_GLOB, Board, generate_sample, load_sample_codec

RUN_CONFIG = "config.json"


class TrainingError(ValleError):
    """Training cannot go on (diverged, nothing to train on, a run folder in the way)."""



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
    """The autocast dtype of training (None = fp32).

    auto: bf16 on a GPU that has it, fp32 elsewhere. bf16 on a CPU runs too (oneDNN's bf16 kernels:
    1.7x the fp32 tokens/s of the small preset on an AVX512-BF16 CPU); on a CPU without native bf16 it
    is slower than fp32, which a warning says.
    """
    import torch

    if precision == "fp32":
        return None
    if device.startswith("cuda"):
        if precision == "auto" and not torch.cuda.is_bf16_supported():
            return None
        return torch.bfloat16
    if precision == "auto":
        return None
    if not cpu_has_native_bf16():
        warnings.warn("--precision bf16: this CPU has no native bf16 (AVX512-BF16 / AMX), so bf16 autocast runs "
                      "slower than fp32 here; --precision fp32 is faster", stacklevel=2)
    return torch.bfloat16


def cpu_has_native_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


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
    return tasks.collate(examples, model_config.codebook_size, model_config.unified_positions,
                         model_config.task_after_prompt)


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
    return tasks.collate(examples, model_config.codebook_size, model_config.unified_positions,
                         model_config.task_after_prompt)


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
        """Stops the thread and waits for it: a daemon thread still inside torch's C++ code when the
        interpreter exits is unwound by force, and the process aborts ("terminate called without an
        active exception", exit -6) after the run's work is done."""
        self._stop.set()
        while self._thread.is_alive():
            while not self._queue.empty():  # a producer blocked on a full queue sees the stop flag
                self._queue.get_nowait()
            self._thread.join(timeout=0.1)


# ----------------------------------------------------------------------------- model, optimizer, schedule


def build_model(model_config: ModelConfig, train_config: TrainConfig, device: str) -> Any:
    import torch

    from valle_cli.model.valle import CodecLM, GuideConfig

    if model_config.attention == "flex" and not device.startswith("cuda"):
        raise InputError("--attention flex trains on a CUDA device only (FlexAttention has no backward on the "
                         "CPU); use --attention auto")
    with torch.device("cpu"):
        model = CodecLM(model_config, len_loss_weight=train_config.len_loss_weight, guide=GuideConfig(
            weight=train_config.align_loss_weight, width=train_config.align_width,
            layer=train_config.align_layer, heads=train_config.align_heads))
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
             lora: dict[str, Any] | None, sampling: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model_config.to_dict(), "tasks": task_config.to_dict(), "train": train_config.to_dict(),
        "codec": data.codec, "tokenizer": data.tokenizer_meta, "text_settings": data.text_settings,
        "frame_rate": data.frame_rate, "sample_rate": data.meta.get("sample_rate"),
        "shards": str(data.folder), "lora": lora, "sampling": sampling,
    }


def find_codec_file(data: Any) -> Path | None:
    """The fitted built-in codec file of the shards' codes (recorded path, or beside the codes), if found."""
    if data.codec.get("name") != "builtin":
        return None
    try:  # the codec found records where it was loaded from
        return Path(data.load_codec().spec["path"])
    except ValleError:
        return None


def check_resumable(out: Path) -> None:
    """A run folder to resume: its config, and a last checkpoint of a format version this valle reads."""
    if not (out / RUN_CONFIG).is_file():
        raise InputError(f"{out}: nothing to resume (no {RUN_CONFIG}); drop --resume to start a run")
    ckpt.read_meta(ckpt.resolve_checkpoint(out))  # the format version before anything else is read


def prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The saved run config when resuming; refuses to mix two runs in one folder."""
    has_run = (out / RUN_CONFIG).is_file() or bool(ckpt.list_checkpoints(out))
    if resume:
        return read_run_config(out)
    if has_run and not overwrite:
        raise InputError(f"{out}: holds a run already (--resume continues it, --overwrite starts again)")
    if has_run:
        import shutil

        for name in (ckpt.CHECKPOINTS_DIR,):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (RUN_CONFIG, LOG_FILE, CURVES_FILE, ckpt.BEST_FILE):
            (out / name).unlink(missing_ok=True)
        for events in out.glob(EVENTS_GLOB):  # the old run's TensorBoard files
            events.unlink()
    return None


def read_run_config(out: Path) -> dict[str, Any]:
    """The run folder's config.json (the configs a resume trains with)."""
    path = out / RUN_CONFIG
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    missing = [key for key in ("model", "tasks", "train") if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise FormatError(f"{path}: not a valle run config (no {', '.join(repr(k) for k in missing)})")
    return saved


# ----------------------------------------------------------------------------- metrics


AUX_STATS = ("len", "align")  # stats that are not a loss per code: left out of the validation loss


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
            with autocast(device, dtype):
                out = model(batch)
            meter.add(out.stats)
            coded = {name: stat for name, stat in out.stats.items() if name not in AUX_STATS}
            n = sum(count for _, count, _ in coded.values())
            total += sum(float(loss) for loss, _, _ in coded.values())
            tokens += int(n)
    model.train(was_training)
    return {"loss": total / max(tokens, 1), "tasks": meter.summary()}



# ----------------------------------------------------------------------------- the loop


def train(shards: str | os.PathLike[str], out: str | os.PathLike[str], model_config: ModelConfig,
          task_config: tasks.TaskConfig = tasks.TaskConfig(), train_config: TrainConfig = TrainConfig(),
          device: str = "auto", resume: bool = False, overwrite: bool = False,
          init_from: str | os.PathLike[str] | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          sampling: dict[str, Any] | None = None) -> TrainReport:
    """Train a CodecLM on a ``valle shard`` folder; checkpoints and logs go to the run folder ``out``.

    ``on_step`` receives a small dict after every optimizer step (step, loss of the last logged
    step, tokens/s, whether the step was skipped) for progress display. ``sampling``: generation
    settings saved with every checkpoint (``training.config.read_sampling``). With ``resume`` the saved
    run config wins over the arguments, except ``train_config.max_steps`` (a run can be extended).
    """
    start_time = time.perf_counter()
    out = Path(out)
    device, dist = setup_device(device)
    if resume:
        check_resumable(out)
    data = open_shards(shards)  # all checks of the data before the run folder is touched
    model_config, task_config, train_config, saved = settle_configs(out, resume, overwrite, dist, model_config,
                                                                    task_config, train_config)
    if saved:
        sampling = read_run_config(out).get("sampling")
    run = build_run(data, out, model_config, task_config, train_config, device, dist,
                    init_from=None if saved else init_from, sampling=dict(sampling or {}))
    if resume:
        restore(run)
    elif dist.main:
        write_run_config(run)
    run.report.start_step, run.report.best_val_loss = run.step, run.best
    if run.step >= train_config.max_steps:
        run.report.steps = run.step
        return run.report
    wrap_for_training(run)
    if dist.main:
        run.board = Board(out, purge_step=run.step if resume else None)

    loader = Prefetcher(partial(batch_stream, run, run.step))
    window = LogWindow()
    sampler_state, last_saved = run.sampler.state_dict(), run.step
    run.train_model.train()
    try:
        while run.step < train_config.max_steps:
            next_sampler_state, finite = forward_backward(run, loader, window)
            with interrupts_held():  # a Ctrl-C in here waits: the saved state is always that of a whole step
                step_or_skip(run, finite)
                sampler_state, run.step = next_sampler_state, run.step + 1
                run.report.steps = run.step
                if due(run.step, train_config.log_every, train_config.max_steps):
                    log_window(run, window)
                    window = LogWindow()
            if on_step is not None and dist.main:
                on_step({"step": run.step, "max_steps": train_config.max_steps, "loss": run.report.last_loss,
                         "tokens_per_s": run.report.tokens_per_second, "skipped": not finite})
            is_best = due(run.step, train_config.eval_every, train_config.max_steps) and evaluate(run)
            if due(run.step, train_config.save_every, train_config.max_steps) or is_best:
                save(run, sampler_state, is_best)
                last_saved = run.step
    except KeyboardInterrupt:
        run.report.interrupted = True
        if run.step > last_saved:  # never lose finished steps
            save(run, sampler_state)
        raise
    finally:
        loader.close()
        if run.board is not None:
            run.board.close()
        run.report.wall_seconds = time.perf_counter() - start_time
    return run.report


@dataclass
class Run:
    """One training run: what the set-up phases build and the loop's phases read and advance."""

    out: Path
    dist: Distributed
    device: str
    model_config: ModelConfig
    task_config: tasks.TaskConfig
    config: TrainConfig
    train_data: Any  # ShardSet views of the two splits
    val_data: Any
    sampler: Any  # TokenBudgetBatchSampler, or PriorityWindowSampler for continuation
    model: Any  # the CodecLM
    optimizer: Any
    scheduler: Any
    meta: dict[str, Any]  # the run config (config.json)
    lora: dict[str, Any] | None
    codec_file: Path | None
    report: TrainReport
    dtype: Any = None  # autocast dtype; None = fp32
    train_model: Any = None  # the model, or its DDP wrapper
    step: int = 0
    best: float | None = None
    nan_streak: int = 0
    board: Board | None = None  # rank 0 only
    sample_codec: Any = None  # decodes the audio samples; False once it proved unavailable


@dataclass
class LogWindow:
    """What the steps since the last log entry add up: read on the host only at the log step."""

    meter: TaskMeter = field(default_factory=lambda: TaskMeter())
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    losses: list[Any] = field(default_factory=list)  # () device tensors, one per step
    grad_norm: Any = None  # () device tensor of the last step


def due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


# ----------------------------------------------------------------------------- setting up


def setup_device(device: str) -> tuple[str, Distributed]:
    """The device this process trains on, and its place among the DDP processes."""
    import torch

    from valle_cli.common import resolve_device

    device = resolve_device(device)
    dist = setup_distributed(device)
    device = rank_device(device, dist)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return device, dist


def settle_configs(out: Path, resume: bool, overwrite: bool, dist: Distributed, model_config: ModelConfig,
                   task_config: tasks.TaskConfig, train_config: TrainConfig
                   ) -> tuple[ModelConfig, tasks.TaskConfig, TrainConfig, bool]:
    """The configs this run trains with (the saved ones when resuming) and whether they were saved."""
    saved = prepare_run_folder(out, resume, overwrite) if dist.main else None
    if dist.world_size > 1:  # every rank needs the saved config; it is on a shared disk
        import torch.distributed

        torch.distributed.barrier()
        if resume:
            saved = read_run_config(out)
    if saved is None:
        return model_config, task_config, train_config, False
    return (ModelConfig.from_saved(saved["model"]), tasks.TaskConfig.from_dict(saved["tasks"]),
            replace(TrainConfig.from_dict(saved["train"]), max_steps=train_config.max_steps), True)


def open_shards(shards: str | os.PathLike[str]) -> Any:
    """The ShardSet to train on, checked whole: headers, index rows tiling the shards, every value in range."""
    from valle_cli.data.shards import ShardSet

    data = ShardSet(shards)
    if len(data.select("train")) == 0:
        raise TrainingError(f"{shards}: no training utterances (all of them are in the validation split)")
    data.check_values()
    return data


def build_run(data: Any, out: Path, model_config: ModelConfig, task_config: tasks.TaskConfig,
              train_config: TrainConfig, device: str, dist: Distributed,
              init_from: str | os.PathLike[str] | None, sampling: dict[str, Any]) -> Run:
    """Sampler, model (from ``init_from``, with LoRA), optimizer and schedule of a fresh run on ``data``."""
    import torch

    from valle_cli.model.valle import count_parameters

    train_data, val_data = data.select("train"), data.select("val")
    model_config = override(model_config, n_codebooks=data.n_codebooks, codebook_size=data.codebook_size,
                            text_vocab_size=data.text_vocab_size)
    sampler = train_sampler(train_data, task_config, train_config, dist)

    torch.manual_seed(train_config.seed)
    model = build_model(model_config, train_config, device)
    if init_from is not None:
        source = ckpt.resolve_checkpoint(init_from)
        ckpt.read_meta(source)  # the format version before the weights
        load_into(model, ckpt.load_weights(source), str(source))
    lora = add_lora(model, train_config) if train_config.lora_rank > 0 else None  # resuming: lora_rank is saved
    optimizer = build_optimizer(model, train_config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_config))
    return Run(out=out, dist=dist, device=device, model_config=model_config, task_config=task_config,
               config=train_config, train_data=train_data, val_data=val_data, sampler=sampler, model=model,
               optimizer=optimizer, scheduler=scheduler, lora=lora, codec_file=find_codec_file(data),
               meta=run_meta(model_config, task_config, train_config, data, lora, sampling),
               report=TrainReport(out=out, parameters=count_parameters(model)),
               dtype=autocast_dtype(train_config.precision, device))


def train_sampler(data: Any, task_config: tasks.TaskConfig, config: TrainConfig, dist: Distributed) -> Any:
    """Training batches of this rank: token-budget batches of utterances, or continuation windows."""
    from valle_cli.data.batching import TokenBudgetBatchSampler

    if config.task == "continuation":
        return window_sampler(data, config, dist)
    costs = sequence_costs(data.index, task_config, data.frame_rate)
    weights = data.index["weight"].to_numpy()
    use_weights = config.weighted and not np.allclose(weights, 1.0)
    return TokenBudgetBatchSampler(
        costs, config.batch_tokens, weights=weights if use_weights else None, n_buckets=config.n_buckets,
        max_batch_size=config.max_batch_size or None, seed=config.seed, rank=dist.rank,
        world_size=dist.world_size, oversize="single",
    )


def restore(run: Run) -> None:
    """Weights, optimizer, schedule, sampler position, torch RNG and counters of the run's last checkpoint."""
    last = ckpt.resolve_checkpoint(run.out)
    state, optimizer_tensors = ckpt.load_state(last)  # checks the format version before reading anything else
    load_into(run.model, ckpt.load_weights(last), str(last))
    try:
        restore_train_state(run, state, optimizer_tensors)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise FormatError(f"{last / ckpt.STATE_DIR}: cannot resume from this train state "
                               f"({type(e).__name__}: {e})") from None
    if run.dist.main:
        truncate_log(run.out, run.step)


def restore_train_state(run: Run, state: dict[str, Any], optimizer_tensors: dict[str, Any]) -> None:
    import torch

    run.optimizer.load_state_dict(ckpt.optimizer_from_safetensors(optimizer_tensors, state["optimizer"]))
    run.scheduler.load_state_dict(state["scheduler"])
    rank = run.dist.rank
    run.sampler.load_state_dict(state["sampler"][rank] if rank < len(state["sampler"]) else {})
    torch.set_rng_state(torch.tensor(state["torch_rng"][rank], dtype=torch.uint8))
    run.step, run.best, run.nan_streak = int(state["step"]), state.get("best_val_loss"), int(state.get("nan_streak", 0))


def write_run_config(run: Run) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / RUN_CONFIG).write_text(json.dumps(run.meta, indent=2) + "\n")


def wrap_for_training(run: Run) -> None:
    """DDP around the model on several ranks; torch.compile of the backbone when asked."""
    import torch

    run.train_model = run.model
    if run.dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.device] if run.device.startswith("cuda") else None
        run.train_model = DistributedDataParallel(run.model, device_ids=device_ids, find_unused_parameters=True)
    if run.config.compile:
        # Only the backbone: the embeddings and heads branch on which tasks a batch holds, and a
        # compiled whole model would recompile for every new combination. Compiling the forward
        # method (not wrapping the module) keeps the parameter names, so checkpoints do not change.
        run.model.backbone.forward = torch.compile(run.model.backbone.forward, dynamic=True)


def batch_stream(run: Run, step: int) -> Iterator[tuple[int, int, tasks.SequenceBatch, dict[str, Any]]]:
    """(step, micro-step, laid-out batch, sampler state after it) from ``step`` on, for the Prefetcher."""
    config, batches = run.config, run.sampler.batches()
    while True:
        for micro in range(config.grad_accum):
            rows = next(batches)
            state = run.sampler.state_dict()
            rng = np.random.default_rng([config.seed, step, micro, run.dist.rank])
            if config.task == "continuation":
                laid_out = make_window_batch(run.train_data, rows, rng, run.task_config, config, run.model_config)
            else:
                laid_out = make_batch(run.train_data, rows, rng, run.task_config, run.model_config)
            yield step, micro, laid_out, state
        step += 1


# ----------------------------------------------------------------------------- one step


def forward_backward(run: Run, loader: Prefetcher, window: LogWindow) -> tuple[dict[str, Any], bool]:
    """``grad_accum`` micro-batches forward and backward, then clipping. Returns the sampler state after
    the step's batches and whether the loss and the gradients are finite (the one host sync of a step).
    Nothing that a checkpoint holds changes here: ``step_or_skip`` does that."""
    import torch

    from valle_cli.model.valle import Batch

    config = run.config
    loss = torch.zeros((), device=run.device)  # () mean loss of the step, kept on the device
    for micro in range(config.grad_accum):
        batch_step, batch_micro, laid_out, sampler_state = next(loader)
        assert (batch_step, batch_micro) == (run.step, micro), (batch_step, batch_micro, run.step, micro)
        batch = Batch.from_numpy(laid_out, run.device)
        with gradient_sync(run, micro), autocast(run.device, run.dtype):
            result = run.train_model(batch)
            (result.loss / config.grad_accum).backward()
        loss = loss + result.loss.detach().float() / config.grad_accum
        window.tokens += batch.tokens
        window.meter.add(result.stats)
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.clip)
                 if config.clip > 0 else _grad_norm(run.model))
    finite = all_finite(loss, grad_norm, run.dist)
    window.losses.append(loss)
    window.grad_norm = grad_norm
    return sampler_state, finite


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then hand it to the handler it was meant for.

    The optimizer step, the schedule, the step counter and the sampler position move together in the
    block, so the checkpoint that Ctrl-C writes is the state of one whole step and ``--resume``
    continues exactly. The handler in place (Python's default raises KeyboardInterrupt) runs after
    the block; a no-op outside the main thread (which never gets signals) and where SIGINT is not
    handled in Python (ignored, or the OS default).
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    received: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        previous(*received[0])


def gradient_sync(run: Run, micro: int) -> AbstractContextManager[Any]:
    """DDP all-reduces the gradients on the last micro-batch of a step only."""
    last = micro == run.config.grad_accum - 1 or run.dist.world_size == 1
    return run.train_model.no_sync() if not last and hasattr(run.train_model, "no_sync") else nullcontext()


def autocast(device: str, dtype: Any) -> AbstractContextManager[Any]:
    import torch

    return torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None)


def all_finite(loss: Any, grad_norm: Any, dist: Distributed) -> bool:
    """Whether the step's loss and gradient norm are finite on every rank (a device -> host sync)."""
    import torch

    flag = (torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))).float().reshape(1)
    if dist.world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def step_or_skip(run: Run, finite: bool) -> None:
    """The optimizer step, or a skipped one (stop after ``nan_patience`` in a row); the schedule moves on."""
    if finite:
        run.optimizer.step()
        run.nan_streak = 0
    else:
        run.nan_streak += 1
        run.report.skipped_steps += 1
        if run.nan_streak >= run.config.nan_patience:
            raise TrainingError(f"loss or gradients were NaN/inf for {run.nan_streak} steps in a row (step "
                                f"{run.step + 1}); lower --lr or raise --warmup-steps, or resume from an "
                                "earlier checkpoint")
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped step still counts: the schedule follows the step number
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        run.scheduler.step()


# ----------------------------------------------------------------------------- log, validate, save


def log_window(run: Run, window: LogWindow) -> None:
    """The log.jsonl entry (and TensorBoard scalars) of the steps since the last one."""
    import torch

    losses = torch.stack(window.losses).tolist()  # the host reads the window's losses here, once
    for value in losses:
        if math.isnan(run.report.first_loss):
            run.report.first_loss = value
    run.report.last_loss = losses[-1]
    finite = [v for v in losses if math.isfinite(v)]
    rate = window.tokens * run.dist.world_size / max(time.perf_counter() - window.start, 1e-9)
    record = {"step": run.step, "split": "train", "loss": sum(finite) / len(finite) if finite else float("nan"),
              "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(window.grad_norm),
              "tokens_per_s": rate, "tasks": window.meter.summary(), "time": time.time()}
    if run.dist.main:
        append_log(run.out, record)
        if run.board is not None:
            run.board.add_record(record)
    run.report.tokens_per_second = rate


def evaluate(run: Run) -> bool:
    """Rank 0 validates (log.jsonl, TensorBoard, an audio sample); True on every rank for a new best."""
    is_best = False
    if run.dist.main:  # the other ranks wait for its verdict below
        result = validate(run.model, run.val_data, run.task_config, run.model_config, run.config, run.device,
                          run.dtype)
        if result is not None:
            record = {"step": run.step, "split": "val", **result, "time": time.time()}
            append_log(run.out, record)
            if run.board is not None:
                run.board.add_record(record)
            is_best = run.best is None or result["loss"] < run.best
            if is_best:
                run.best = run.report.best_val_loss = result["loss"]
        write_audio_sample(run)
    return broadcast_flag(is_best, run.dist, run.device)  # saving is collective: every rank must agree


def write_audio_sample(run: Run) -> None:
    """A few seconds generated by the model for one validation utterance, decoded, into TensorBoard."""
    if run.board is None or run.board.writer is None or run.sample_codec is False:
        return
    if run.sample_codec is None:
        run.sample_codec = load_sample_codec(run.train_data) or False
        if run.sample_codec is False:
            return
    data = run.val_data if len(run.val_data) else run.train_data
    codes = generate_sample(run.model, data, run.config.task, seed=run.config.seed, dtype=run.dtype)
    (wav,) = run.sample_codec.decode([codes])
    run.board.add_audio("val/sample", wav, run.sample_codec.sample_rate, run.step)
    run.board.flush()


def save(run: Run, sampler_state: dict[str, Any], is_best: bool = False) -> None:
    """A checkpoint with the whole train state (every rank takes part; rank 0 writes), then curves.png."""
    import torch

    states = gather(sampler_state, run.dist)
    rngs = gather(torch.get_rng_state().tolist(), run.dist)
    if not run.dist.main:
        return
    tensors, rest = ckpt.optimizer_to_safetensors(run.optimizer.state_dict())
    lora_file = None
    if run.lora:
        from valle_cli.model.lora import LoraConfig, save_lora

        lora_file = (save_lora, run.model.backbone, LoraConfig.from_dict(run.lora), {"step": run.step})
    path = ckpt.save_checkpoint(
        run.out, run.step, run.model.state_dict(), {**run.meta, "best_val_loss": run.best},
        train_state={"step": run.step, "optimizer": rest, "scheduler": run.scheduler.state_dict(),
                     "sampler": states, "torch_rng": rngs, "best_val_loss": run.best, "nan_streak": run.nan_streak},
        optimizer_tensors=tensors, lora_file=lora_file, keep_last=run.config.keep_last,
        extra_files={"codec.safetensors": run.codec_file} if run.codec_file else None,
    )
    run.report.checkpoints.append(str(path))
    plot_curves(run.out)
    if is_best:
        ckpt.mark_best(run.out, path)


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



def _grad_norm(model: Any) -> Any:
    import torch

    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())

