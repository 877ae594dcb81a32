"""Checkpoints of ``valle train``: a folder per save, no pickle anywhere (FORMATS.md "Checkpoints").

    run/
      config.json                    the resolved run config (model, tasks, train, data)
      log.jsonl                      one JSON object per logged step / evaluation
      curves.png                     loss and accuracy per task
      checkpoints/step-0000500/      one save:
        model.safetensors              weights (LoRA adapters included, by name, when training a LoRA)
        config.json                    format_version, step, model config, codec, tokenizer, lora, metrics
        lora.safetensors               the adapters alone (only for LoRA runs; load with model.lora)
        codec.safetensors              the fitted built-in codec the codes came from (when it was found)
        train_state/
          optimizer.safetensors        every optimizer tensor, by "<param index>.<name>"
          state.json                   optimizer param groups and scalars, scheduler, loader, step,
                                       NaN-guard counters, torch RNG (as a list of bytes)
      best -> checkpoints/step-...   (a text file naming the best checkpoint by validation loss)

A save goes to a temporary folder that is renamed into place at the end: a killed run never
leaves a checkpoint that looks complete. ``load_model`` checks the format version first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from valle_cli.errors import FormatError, InputError

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KIND = "valle-checkpoint"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LORA_FILE = "lora.safetensors"
STATE_DIR = "train_state"
CHECKPOINTS_DIR = "checkpoints"
BEST_FILE = "best"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    folder = Path(run) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / CONFIG_FILE).is_file() and (p / MODEL_FILE).is_file())


def resolve_checkpoint(path: str | os.PathLike[str], which: str = "last") -> Path:
    """A checkpoint folder, or a run folder (its last checkpoint, or ``which="best"``)."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint or run folder")
    if which == "best" and (path / BEST_FILE).is_file():
        best = path / (path / BEST_FILE).read_text().strip()
        if (best / MODEL_FILE).is_file():
            return best
    found = list_checkpoints(path)
    if not found:
        raise InputError(f"{path}: no checkpoint in it (expected {MODEL_FILE} or {CHECKPOINTS_DIR}/step-*)")
    return found[-1]


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder}: not a checkpoint (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND:
        raise FormatError(f"{path}: not a valle checkpoint config")
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise FormatError(f"{folder}: checkpoint format version {meta.get('format_version')} is not supported "
                          f"(this valle reads version {CHECKPOINT_FORMAT_VERSION})")
    return meta


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(run: str | os.PathLike[str], step: int, model_state: dict[str, Any], meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None, optimizer_tensors: dict[str, Any] | None = None,
                    lora_file: tuple[Any, ...] | None = None, keep_last: int = 0,
                    extra_files: dict[str, Path] | None = None) -> Path:
    """Write ``run/checkpoints/step-N`` atomically (temporary folder + rename); prune old saves.

    ``lora_file`` = (save function, *args) writes ``lora.safetensors`` into the folder.
    ``keep_last`` > 0 keeps that many newest checkpoints, plus the one ``best`` names.
    ``extra_files`` (name -> source) are copied in: the fitted codec, so a checkpoint is self-contained.
    """
    from safetensors.torch import save_file

    run = Path(run)
    final = run / CHECKPOINTS_DIR / checkpoint_name(step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "kind": CHECKPOINT_KIND})
        _write_json(tmp / CONFIG_FILE, {**meta, "kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_FORMAT_VERSION,
                                        "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        if lora_file is not None:
            save, *args = lora_file
            save(tmp / LORA_FILE, *args)
        if train_state is not None:
            (tmp / STATE_DIR).mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in (optimizer_tensors or {}).items()},
                      str(tmp / STATE_DIR / "optimizer.safetensors"))
            _write_json(tmp / STATE_DIR / "state.json", train_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if keep_last > 0:
        keep = set(list_checkpoints(run)[-keep_last:])
        best = run / BEST_FILE
        if best.is_file():
            keep.add(run / best.read_text().strip())
        for old in list_checkpoints(run):
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)
    return final


def mark_best(run: str | os.PathLike[str], checkpoint: Path) -> None:
    from valle_cli.formats import atomic_write_bytes

    atomic_write_bytes(Path(run) / BEST_FILE, f"{checkpoint.relative_to(run)}\n".encode())


TRAIN_STATE_KEYS = ("step", "optimizer", "scheduler", "sampler", "torch_rng")  # what a resume needs


def load_state(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, optimizer tensors) of a checkpoint saved with a train state; the format version first."""
    folder = Path(folder)
    read_meta(folder)
    state_dir = folder / STATE_DIR
    path = state_dir / "state.json"
    if not path.is_file():
        raise InputError(f"{folder}: has no {STATE_DIR}/ to resume from (was it exported without it?)")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    missing = [key for key in TRAIN_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise FormatError(f"{path}: not a complete train state (no {', '.join(repr(k) for k in missing)})")
    return state, read_tensors(state_dir / "optimizer.safetensors", "optimizer state")


def load_weights(folder: str | os.PathLike[str]) -> dict[str, Any]:
    return read_tensors(Path(folder) / MODEL_FILE, "weights")


def read_tensors(path: Path, what: str) -> dict[str, Any]:
    """A safetensors file; a missing, truncated or foreign file is a FormatError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: unreadable {what} ({e})") from None


# ----------------------------------------------------------------------------- optimizer state (no pickle)


def optimizer_to_safetensors(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors by "<index>.<name>", JSON-able rest)."""
    import torch

    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}
