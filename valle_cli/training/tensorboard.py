"""TensorBoard event files in the run folder: ``tensorboard --logdir run/``.

Rank 0 writes the logged scalars (the same numbers as log.jsonl: loss, lr, grad norm, tokens/s, and
loss and top-1 accuracy per task; ``train/...`` at every log step, ``val/...`` at every evaluation)
and, at every evaluation, an audio sample: the model being trained generates a few seconds for one
validation utterance (its text, prompted by the same speaker; continuation runs: the continuation of
its first second), decoded by the codec of the shards. Without tensorboard, or without the codec,
the run goes on without them (one warning).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli.errors import ValleError

EVENTS_GLOB = "events.out.tfevents.*"  # what SummaryWriter names its files
SAMPLE_SECONDS = 3.0  # generated audio per sample (continuation: after a prompt of at most 1 s)
PROMPT_SECONDS = 3.0  # at most this much of the prompt utterance


class Board:
    """A SummaryWriter on the run folder, or nothing (and one warning) when tensorboard is not installed."""

    def __init__(self, out: Path, purge_step: int | None = None):
        self.writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"no TensorBoard events in {out}: tensorboard is not importable ({e}); "
                          "pip install tensorboard", stacklevel=2)
            return
        # purge_step: a resumed run drops the events a killed run wrote past its last checkpoint
        self.writer = SummaryWriter(log_dir=str(out), purge_step=purge_step)

    def add_record(self, record: dict[str, Any]) -> None:
        """A log.jsonl entry as scalars: <split>/loss, <split>/lr, ..., <split>/<task>/loss and /acc."""
        if self.writer is None:
            return
        split, step = record["split"], record["step"]
        for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            if name in record:
                self.writer.add_scalar(f"{split}/{name}", record[name], step)
        for task, values in record.get("tasks", {}).items():
            for name in ("loss", "acc"):
                self.writer.add_scalar(f"{split}/{task}/{name}", values[name], step)

    def add_audio(self, tag: str, wav: np.ndarray, sample_rate: int, step: int) -> None:
        if self.writer is None:
            return
        import torch

        self.writer.add_audio(tag, torch.from_numpy(np.clip(wav, -1.0, 1.0)).float()[None], step,
                              sample_rate=int(sample_rate))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def load_sample_codec(data: Any) -> Any:
    """The codec of the shards' codes on the CPU, or None (with a warning) when it cannot be built."""
    try:
        return data.load_codec()
    except (ValleError, OSError, ImportError) as e:
        warnings.warn(f"no audio samples in TensorBoard: the codec of the shards cannot be built ({e})",
                      stacklevel=2)
        return None


def generate_sample(model: Any, data: Any, task: str, seed: int, dtype: Any = None,
                    seconds: float = SAMPLE_SECONDS) -> np.ndarray:
    """(K, T) codes the model makes for the first utterance of ``data`` (a ShardSet split); T <= a few seconds.

    tts: its text, prompted by another utterance of its speaker (itself when it has none);
    continuation: its first second, continued by ``seconds``. Seeded; the model's mode is restored.
    """
    import torch

    from valle_cli.generation.generate import GenerateConfig, Request, continue_audio, synthesize

    frames = max(1, int(seconds * data.frame_rate))
    text, codes = data.record(0)
    config = GenerateConfig(max_frames=frames)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if task == "continuation":
                prompt = np.asarray(codes[:, : max(1, int(data.frame_rate))], np.int64)
                tape, _ = continue_audio(model, prompt, frames, config, seed=seed)
                return tape
            candidates = data.prompt_candidates(0)
            _, prompt_codes = data.record(int(candidates[0])) if len(candidates) else (text, codes)
            prompt = np.asarray(prompt_codes[:, : int(PROMPT_SECONDS * data.frame_rate)], np.int64)
            request = Request(text=np.asarray(text, np.int64), prompt=prompt, duration=min(frames, codes.shape[1]))
            (out,) = synthesize(model, [request], config, seed=seed)
            return out
    finally:
        model.train(was_training)
