"""Checkpoints -> models: what ``valle sample``, ``train --merge-lora`` and ``train --init-from`` load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from valle_cli import checkpoint as ckpt
from valle_cli.errors import InputError


def load_model(path: str | os.PathLike[str], device: str = "cpu", which: str = "last") -> tuple[Any, dict[str, Any]]:
    """(CodecLM in eval mode on ``device``, checkpoint config) from a checkpoint or a run folder."""
    from valle_cli.model.config import ModelConfig
    from valle_cli.model.valle import CodecLM

    folder = ckpt.resolve_checkpoint(path, which)
    meta = ckpt.read_meta(folder)  # format version first: nothing else is trusted before it
    model = CodecLM(ModelConfig.from_saved(meta["model"]))
    if meta.get("lora"):
        from valle_cli.model.lora import LoraConfig, apply_lora

        apply_lora(model.backbone, LoraConfig.from_dict(meta["lora"]))
    load_into(model, ckpt.load_weights(folder), str(folder))
    return model.to(device).eval(), meta


QUANTIZE = ("none", "int8")


def prepare_for_decoding(model: Any, quantize: str = "none") -> list[str]:
    """Make a loaded CodecLM faster to sample from, in place; returns what was done, for the log.

    ``int8``: the native backbone's q/k/v and gate/up projections fused into one matrix each (measured:
    a gain only with int8 weights; in fp32 the fused products ran slower on one CPU core), then every
    linear layer of the backbone and heads as weight-only int8 (model/int8.py). ``none`` changes
    nothing. Inference only: the state_dict of the result is not a checkpoint's.
    """
    from valle_cli.model.int8 import quantize_int8
    from valle_cli.model.transformer import Transformer

    if quantize not in QUANTIZE:
        raise InputError(f"--quantize {quantize!r}: expected {' | '.join(QUANTIZE)}")
    if quantize == "none":
        return []
    done = []
    if isinstance(model.backbone, Transformer):
        done.append(f"{model.backbone.fuse_projections()} projections fused")
    done.append(f"{len(quantize_int8(model))} linear layers as int8")
    return done


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


def merge_lora_checkpoint(source: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """A LoRA checkpoint with its adapters folded into the weights, saved as a plain checkpoint in ``out``."""
    from valle_cli.model.lora import merge_lora

    out = Path(out)
    model, meta = load_model(source)
    if not meta.get("lora"):
        raise InputError(f"{source}: has no LoRA adapters to merge")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: exists and is not empty (--overwrite replaces it)")
    merge_lora(model.backbone)
    step = int(meta["step"])
    merged = {**{k: v for k, v in meta.items() if k not in ("kind", "format_version", "step", "saved_at")},
              "lora": None, "merged_from": str(ckpt.resolve_checkpoint(source))}
    tmp_run = out.with_name(f".{out.name}.merge-{os.getpid()}")
    shutil.rmtree(tmp_run, ignore_errors=True)
    try:
        saved = ckpt.save_checkpoint(tmp_run, step, model.state_dict(), merged)
        if out.exists():
            shutil.rmtree(out)
        os.replace(saved, out)
    finally:
        shutil.rmtree(tmp_run, ignore_errors=True)
    return out
