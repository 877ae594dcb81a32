"""LoRA: low-rank adapters for finetuning any model built from ``nn.Linear`` layers.

What gets adapted. ``apply_lora`` walks the model and wraps every ``nn.Linear`` whose qualified
name ends with one of ``LoraConfig.targets`` (a whole name component: ``"wq"`` matches
``layers.0.attention.wq`` but not ``layers.0.attention.xwq``; a dotted target such as
``"attention.wq"`` also works). The defaults cover our transformer (``wq wk wv wo`` in
``layers.N.attention``, ``w1 w2 w3`` in ``layers.N.feed_forward``) and HF Llama / Mixtral
(``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``). Only ``nn.Linear`` modules are
adapted: anything else with a matching name is skipped, e.g. Mixtral's experts, which recent
transformers store as fused parameter tensors rather than Linear layers. The Mixtral router
(``mlp.gate``) is not a default target. Every other parameter of the model is frozen.

The adapter. A frozen linear ``y = x W^T + b`` (W: (out, in)) becomes

    y = x W^T + b + scale * (dropout(x) A^T) B^T        A: (rank, in), B: (out, rank), scale = alpha / rank

A starts kaiming-uniform (like a fresh nn.Linear) and B starts at zero, so B A = 0 and the
adapted model computes exactly what the base model does at step 0: finetuning starts from the
pretrained function, not from a random perturbation of it. The gradient of B is not zero (it
depends on A and x), so B moves on the first step and A follows.

Export and merge. ``lora_state_dict`` holds only the A/B tensors (a few MB for a large model);
``save_lora`` writes them to a safetensors file with the ``LoraConfig`` (rank, alpha, targets)
and free-form ``meta`` as JSON in its metadata. To use an adapter later:

    state, config, meta = load_lora(path)
    apply_lora(model, config)           # same targets and rank as when it was trained
    load_lora_state_dict(model, state)  # strict: keys and shapes must match exactly

``merge_lora`` folds each adapter into its base weight (W + scale * B A) and puts a plain
``nn.Linear`` back, so the merged model has the base model's structure, speed and checkpoint
layout, and no dependency on this module. While adapted, a wrapped linear's weight lives at
``<name>.base.weight`` in ``model.state_dict()``: load base checkpoints before ``apply_lora``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from valle_cli.common import config_from_dict, config_to_dict
from valle_cli.errors import FormatError, InputError
from valle_cli.formats import atomic_path

LORA_FORMAT_VERSION = 1
LORA_KIND = "valle-lora"  # the "kind" metadata value that marks one of our adapter files

DEFAULT_TARGETS: tuple[str, ...] = (
    # our transformer: attention and SwiGLU feed-forward
    "wq", "wk", "wv", "wo", "w1", "w2", "w3",
    # HF Llama / Mixtral
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16  # r: inner size of the low-rank update B A
    alpha: float = 16.0  # the update is scaled by alpha / rank, so changing rank keeps its size comparable
    dropout: float = 0.0  # dropout on the LoRA path's input while training (the base path is untouched)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes to adapt

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise InputError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise InputError(f"LoRA targets must be a non-empty list of module names, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        return config_from_dict(cls, data, "LoRA")


# ----------------------------------------------------------------------------- the adapted linear


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + scale * B(A(dropout(x)))``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base  # the very same module (and weight tensor) the model had; frozen by apply_lora
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight  # (out, in)
        # A and B live beside W (same device and dtype) so model.to(...) keeps them together
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # A like a fresh nn.Linear(in, rank); B = 0 makes the update zero at init (see module docstring)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # read-through attributes so code that inspects a linear (shapes, dtype, tied weights) still works
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return self.base(x) + self.scale * lora

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``W + scale * B @ A`` (the same bias tensor)."""
        w = self.base.weight
        # accumulate in float32 at least, so a bf16 base rounds once (at the end), not per operation
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = self.scale * (self.lora_B.to(acc) @ self.lora_A.to(acc))  # (out, rank) @ (rank, in)
        # built on the meta device: no throwaway allocation and init; both tensors are replaced below
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device="meta")
        out.weight = nn.Parameter((w.to(acc) + delta).to(w.dtype), requires_grad=w.requires_grad)
        if self.base.bias is not None:
            out.bias = self.base.bias
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


# ----------------------------------------------------------------------------- applying / merging


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _split(name: str) -> tuple[str, str]:
    """``"layers.0.attention.wq"`` -> ``("layers.0.attention", "wq")``."""
    parent, _, child = name.rpartition(".")
    return parent, child


def _lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap every ``nn.Linear`` named by ``config.targets`` in a ``LoraLinear``, in place.

    Freezes every other parameter of ``model`` (``requires_grad = False``) and leaves the LoRA A/B
    parameters trainable; returns the qualified names of the adapted modules, in model order.
    A linear shared under several names gets one adapter, installed at every name.

    Raises ``InputError`` if nothing matched, and also if ``model`` already holds LoRA adapters:
    applying twice is refused rather than ignored, because a second call with another config would
    otherwise be silently dropped (merge with ``merge_lora`` first to stack a new adapter).
    """
    if _lora_modules(model):
        raise InputError("model already has LoRA adapters (merge_lora it first, or load_lora_state_dict into it)")

    # every (name, linear) occurrence, shared modules included, collected before mutating the tree
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
             if n and isinstance(m, nn.Linear) and _matches(n, config.targets)]
    if not found:
        raise InputError(f"LoRA matched no nn.Linear module (targets: {', '.join(config.targets)})")

    wrappers: dict[int, LoraLinear] = {}  # id(base linear) -> its adapter
    names: list[str] = []
    for name, linear in found:
        if id(linear) not in wrappers:
            wrappers[id(linear)] = LoraLinear(linear, config.rank, config.alpha, config.dropout)
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, wrappers[id(linear)])
        names.append(name)

    # freeze by identity, not by name: only the parameters created here stay trainable
    adapter_params = {id(p) for w in wrappers.values() for p in (w.lora_A, w.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoraLinear`` by its merged ``nn.Linear``, in place; returns ``model``.

    Outputs are unchanged up to float rounding. The merged weights keep the base's
    ``requires_grad`` (False after ``apply_lora``); other parameters are left as they are.
    """
    merged: dict[int, nn.Linear] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(m, LoraLinear):
            continue
        if not name:
            raise InputError("merge_lora: the model itself is a LoraLinear; call .merged() on it")
        if id(m) not in merged:
            merged[id(m)] = m.merged()
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, merged[id(m)])
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of scalars with ``requires_grad`` (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- adapter state


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The A/B tensors by qualified name (``layers.0.attention.wq.lora_A``), detached; they share
    storage with the model like ``nn.Module.state_dict`` does (clone to snapshot)."""
    state: dict[str, Tensor] = {}
    for name, m in _lora_modules(model):
        state[f"{name}.lora_A"] = m.lora_A.detach()
        state[f"{name}.lora_B"] = m.lora_B.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy A/B tensors into an already adapted ``model``. Strict: a missing key, an unexpected
    key or a shape mismatch raises ``InputError`` naming the first bad key (in sorted order);
    nothing is copied unless everything matches. Values are cast to each parameter's dtype/device."""
    params = {f"{n}.lora_{ab}": getattr(m, f"lora_{ab}") for n, m in _lora_modules(model) for ab in "AB"}
    if not params:
        raise InputError("model has no LoRA adapters to load into (call apply_lora with the adapter's config first)")
    missing = sorted(set(params) - set(state))
    if missing:
        raise InputError(f"LoRA state is missing {missing[0]!r} ({len(missing)} key(s) missing)")
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise InputError(f"LoRA state has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key in sorted(params):
        if tuple(state[key].shape) != tuple(params[key].shape):
            raise InputError(f"LoRA state {key!r} has shape {tuple(state[key].shape)}, "
                             f"the model expects {tuple(params[key].shape)}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])


# ----------------------------------------------------------------------------- files


def save_lora(path: str | os.PathLike[str], model: nn.Module, config: LoraConfig,
              meta: dict[str, Any] | None = None) -> None:
    """Write the model's adapter to a safetensors file, atomically (temp file beside it, then rename).

    Metadata (all strings): ``kind``, ``format_version``, ``lora_config`` (JSON of ``config``) and
    ``meta`` (JSON of ``meta``, which must be JSON-serialisable: e.g. base checkpoint, step, data).
    """
    from safetensors.torch import save_file

    state = lora_state_dict(model)
    if not state:
        raise InputError("model has no LoRA adapters to save (call apply_lora first)")
    try:
        meta_json = json.dumps(meta or {}, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"LoRA meta is not JSON-serialisable: {exc}") from None
    metadata = {
        "kind": LORA_KIND,
        "format_version": str(LORA_FORMAT_VERSION),
        "lora_config": json.dumps(config.to_dict(), sort_keys=True),
        "meta": meta_json,
    }
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_lora(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], LoraConfig, dict[str, Any]]:
    """Read a file written by ``save_lora``: ``(state, config, meta)``, tensors on the CPU.

    Raises ``InputError`` if the file does not exist, ``FormatError`` if it is not safetensors,
    lacks our metadata, has another format version, or its tensors disagree with its config.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such LoRA adapter file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ... : truncated or not safetensors at all
        raise FormatError(f"{path}: not a LoRA adapter file (unreadable safetensors: {exc})") from None

    if metadata.get("kind") != LORA_KIND:
        raise FormatError(f"{path}: a safetensors file, but not a valle LoRA adapter (no {LORA_KIND!r} metadata)")
    if metadata.get("format_version") != str(LORA_FORMAT_VERSION):
        raise FormatError(f"{path}: LoRA adapter format version {metadata.get('format_version')!r}, "
                          f"this valle reads version {LORA_FORMAT_VERSION}")
    try:
        config = LoraConfig.from_dict(json.loads(metadata["lora_config"]))
        meta = json.loads(metadata.get("meta", "{}"))
        assert isinstance(meta, dict)
    except (KeyError, TypeError, ValueError, AssertionError, InputError):
        raise FormatError(f"{path}: LoRA adapter file with missing or malformed config/meta") from None

    # every adapter is an (A, B) pair of rank config.rank
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        other = f"{module}.lora_{'B' if leaf == 'lora_A' else 'A'}"
        rank_dim = 0 if leaf == "lora_A" else 1
        if leaf not in ("lora_A", "lora_B") or t.ndim != 2 or t.shape[rank_dim] != config.rank or other not in state:
            raise FormatError(f"{path}: LoRA adapter tensor {key!r} does not match its config (rank {config.rank})")
    return state, config, meta
