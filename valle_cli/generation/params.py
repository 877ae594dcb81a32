"""The knobs of generation: ``SamplingParams`` (one per pass) and ``GenerateConfig`` (the whole run).

Plain dataclasses without torch, so ``valle sample --help`` can list every sampler flag from the
fields themselves (name, type, default per pass, and the one-line meaning in each field's metadata)
without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    compile: bool = False  # torch.compile the one-frame AR step (native transformer backbone only)
