"""The knobs of generation: ``SamplingParams`` (one per pass) and ``GenerateConfig`` (the whole run).

Plain dataclasses without torch, so ``valle sample --help`` can list every sampler flag from the
fields themselves (name, type, default per pass, and the one-line meaning in each field's metadata)
without loading a model library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

MODES = ("ar+nar", "nar-len", "auto")
PASSES = ("ar", "nar", "demask")  # the GenerateConfig fields that hold a SamplingParams


def _param(default: Any, meaning: str) -> Any:
    """A SamplingParams field with its one-line meaning (``valle sample --help`` shows it)."""
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class SamplingParams:
    """How one pass turns logits into codes: guidance, penalties, filters, then a draw."""

    temperature: float = _param(1.0, "softmax temperature; <= 0: greedy (argmax)")
    top_k: int = _param(0, "keep the k most likely codes; 0 = off")
    top_p: float = _param(1.0, "keep the fewest codes whose probabilities reach p; 1 = off")
    min_p: float = _param(0.0, "keep codes with p >= min-p * p_max; 0 = off")
    repetition_penalty: float = _param(1.0, "> 1 discourages codes of the last repetition-window frames")
    repetition_window: int = _param(75, "frames the repetition penalty looks back")
    repetition_decay: float = _param(0.0, "an occurrence d frames back counts (1-decay)^(d-1)")
    length_penalty: float = _param(0.0, "> 0 favours longer AR outputs: stop logit -= penalty * log(1 + frames)")
    cfg_strength: float = _param(0.0, "classifier-free guidance c + s (c - u); 0 = off")
    cfg_rescale: float = _param(0.75, "blend towards the guided logits rescaled to the std of c; 0 = plain CFG")


@dataclass(frozen=True)
class GenerateConfig:
    mode: str = "auto"  # ar+nar | nar-len | auto (ar+nar when the model has the AR capability)
    ar: SamplingParams = SamplingParams(temperature=1.0, top_k=0, repetition_penalty=1.0)
    nar: SamplingParams = SamplingParams(temperature=0.0)
    demask: SamplingParams = SamplingParams(temperature=1.0, cfg_strength=2.5)  # NAR-len level 0
    max_frames: int = 2250  # AR stops here at the latest (30 s at 75 frames/s), or at the end of the context
    min_frames: int = 1  # the stop token is banned before this many frames
    steps: int = 25  # NAR-len demasking rounds
    duration_padding: float = 1.0  # NAR-len: predicted length times this
    sync_every: int = 16  # AR: check for all-finished rows every N steps (one host sync)
    # False: recompute the whole sequence every AR step, as e-c-k-e-r/vall-e does (the benchmarks compare)
    use_cache: bool = True
    # AR: the fixed-shape cached step (the whole cache under a mask, Transformer.decode); compile implies it
    fixed_shape: bool = False
    compile: bool = False  # torch.compile the fixed-shape AR step, fullgraph (native transformer backbone only)


# ----------------------------------------------------------------------------- settings by name
# What a recipe (a run's TOML [sample] table, saved with every checkpoint) or the command line says
# about generation, by name: "mode", "steps", "duration_padding", "max_seconds", and every
# SamplingParams field for every pass ("temperature") or one ("ar_temperature"). Hyphens and
# underscores are the same ("ar-top-k" = "ar_top_k").

RUN_SETTINGS: dict[str, type] = {"mode": str, "steps": int, "duration_padding": float, "max_seconds": float}
DEFAULT_MAX_SECONDS = 30.0  # AR: stop after this much audio unless a setting says otherwise


def sampler_field(name: str) -> tuple[str | None, str] | None:
    """``"ar_top_k"`` -> ("ar", "top_k"), ``"top_k"`` -> (None, "top_k"); None for a name that is not a field."""
    known = {f.name for f in fields(SamplingParams)}
    name = name.replace("-", "_")
    if name in known:
        return None, name
    for p in PASSES:
        if name.startswith(p + "_") and name[len(p) + 1:] in known:
            return p, name[len(p) + 1:]
    return None


def check_settings(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Generation settings by name, typed as their fields (``"0.8"`` -> 0.8) under canonical names
    (``ar_temperature``); an unknown name or a bad value raises InputError naming ``where``."""
    from valle_cli.errors import InputError

    types = {f.name: type(f.default) for f in fields(SamplingParams)}
    checked: dict[str, Any] = {}
    for raw_name, value in values.items():
        name = str(raw_name).replace("-", "_")
        field_of = sampler_field(name)
        kind = RUN_SETTINGS.get(name) or (types[field_of[1]] if field_of else None)
        if kind is None:
            raise InputError(f"{where}: unknown generation setting {raw_name!r}")
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            checked[name] = kind(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: {raw_name} = {value!r} is not a {kind.__name__}") from None
    if "mode" in checked and checked["mode"] not in MODES:
        raise InputError(f"{where}: mode {checked['mode']!r}: expected one of {', '.join(MODES)}")
    if checked.get("steps", 1) < 1 or checked.get("max_seconds", 1.0) <= 0:
        raise InputError(f"{where}: steps must be >= 1 and max_seconds > 0")
    return checked


def with_settings(config: GenerateConfig, settings: Mapping[str, Any]) -> GenerateConfig:
    """``config`` with checked ``settings`` applied: a setting for every pass first, then the per-pass
    ones (``temperature`` then ``ar_temperature``). ``max_seconds`` needs the frame rate: not here."""
    run = {k: v for k, v in settings.items() if k in RUN_SETTINGS and k != "max_seconds"}
    everywhere: dict[str, Any] = {}
    per_pass: dict[str, dict[str, Any]] = {p: {} for p in PASSES}
    for name, value in settings.items():
        field_of = sampler_field(name)
        if field_of is not None:
            (per_pass[field_of[0]] if field_of[0] else everywhere)[field_of[1]] = value
    config = replace(config, **run)
    return replace(config, **{p: replace(getattr(config, p), **{**everywhere, **per_pass[p]}) for p in PASSES})
