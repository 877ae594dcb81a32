"""The model configuration: one flat dataclass, presets as data, overridable per field.

``ModelConfig`` describes both the backbone (the transformer that maps embeddings to hidden
states) and the codec LM around it (vocabularies, embeddings, heads, tasks). The three
backbones read the fields they need:

    transformer  our own, after Llama 3: RMSNorm pre-norm, SwiGLU, GQA, RoPE with llama-3 scaling,
                 QK-norm, NoPE layers every n, chunked local attention, MoE with a shared expert
    llama        transformers' LlamaModel built from a LlamaConfig (no download)
    mixtral      transformers' MixtralModel (MoE; router load-balancing loss)

The data fields (``n_codebooks``, ``codebook_size``, ``text_vocab_size``) come from the shards at
train time; the resolved config is written beside every checkpoint (``config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from valle_cli.common import config_from_dict, config_to_dict
from valle_cli.errors import InputError

ARCHES = ("transformer", "llama", "mixtral")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "math", "flex")


@dataclass(frozen=True)
class ModelConfig:
    # -- backbone
    arch: str = "transformer"  # transformer | llama | mixtral
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    n_kv_heads: int = 0  # grouped-query attention: key/value heads; 0 = n_heads
    ffn_dim: int = 0  # SwiGLU hidden size; 0 = 8/3 * dim rounded up to a multiple of 64
    norm_eps: float = 1e-5
    dropout: float = 0.0  # attention-output and FFN-output dropout while training
    max_positions: int = 8192  # RoPE table length; sequences must fit
    rope_theta: float = 10000.0
    rope_scaling: float = 0.0  # llama-3 style frequency scaling factor; 0 = off
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_positions: int = 8192  # the context the unscaled frequencies were meant for
    qk_norm: bool = False  # RMSNorm on queries and keys (per head) before RoPE
    nope_every: int = 0  # every n-th layer (n-1, 2n-1, ...) uses no positional encoding; 0 = none
    attention_chunk: int = 0  # RoPE layers attend within chunks of this many tokens (Llama 4); 0 = global
    moe_experts: int = 0  # routed experts per MoE layer; 0 = dense FFN everywhere
    moe_top_k: int = 2
    moe_shared_expert: bool = True  # one always-on expert beside the routed ones (transformer arch)
    moe_every: int = 1  # every n-th layer is MoE (transformer arch; mixtral: all layers)
    router_aux_loss: float = 0.01  # weight of the load-balancing loss added to the training loss
    attention: str = "auto"  # auto | sdpa | flash | math | flex (see model/attention.py; flex: transformer arch)
    gradient_checkpointing: bool = False
    # -- the codec LM around the backbone (VALL-E's AR + NAR, plus NAR-len)
    n_codebooks: int = 8  # K: codebook levels of the codec
    codebook_size: int = 1024  # codes per level; id codebook_size is the stop / mask token
    text_vocab_size: int = 256
    n_langs: int = 8  # language embedding rows
    audio_embedding_sums: bool = True  # NAR response embedding = sum of the levels below the target
    unified_positions: bool = False  # False: positions restart at 0 in every segment (text, prompt, response)
    # <text> <lang> <prompt> <task> <response>: the causal prefix before the task token is the same for
    # every task of a request, so generation runs it once for the AR and all NAR / NAR-len passes.
    # False: <text> <lang> <task> <prompt> <response>, the layout of checkpoints from before this field.
    task_after_prompt: bool = True
    len_digits: int = 5  # the len task writes the frame count as this many base-10 digits
    capabilities: tuple[str, ...] = ("ar", "nar", "len")

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return 64 * -(-int(8 * self.dim / 3) // 64)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_experts > 0 and (layer + 1) % max(self.moe_every, 1) == 0

    def uses_rope(self, layer: int) -> bool:
        return not (self.nope_every and (layer + 1) % self.nope_every == 0)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return config_from_dict(cls, data, "model")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> ModelConfig:
        """The config a checkpoint or run folder saved: a field it lacks has the value of the code that saved it."""
        # saved before task_after_prompt existed: trained with the task token first
        return cls.from_dict({"task_after_prompt": False, **data})


PRESETS: dict[str, dict[str, Any]] = {
    # tests: a few layers, dim 64
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_positions=2048),
    "small": dict(dim=256, n_layers=6, n_heads=4, ffn_dim=768),
    "base": dict(dim=512, n_layers=12, n_heads=8, ffn_dim=2048),
    # the reference size of e-c-k-e-r/vall-e: 1024-dim, 16 heads, 12 layers, FFN 4x: about 220M parameters
    "full": dict(dim=1024, n_layers=12, n_heads=16, ffn_dim=4096),
}


# Routed experts per preset, used when an MoE backbone is chosen (arch mixtral) without saying how many.
MOE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(moe_experts=4, moe_top_k=2),
    "small": dict(moe_experts=8, moe_top_k=2),
    "base": dict(moe_experts=8, moe_top_k=2),
    "full": dict(moe_experts=8, moe_top_k=2),
}


def with_moe_defaults(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a model config as a dict) with the preset's MoE sizes filled in where the user gave none.

    arch mixtral is MoE in every layer, so it gets the preset's experts when ``moe_experts`` is unset;
    any arch with experts but no ``moe_top_k`` routes to the preset's top-k (at most the experts)."""
    moe = MOE_PRESETS.get(name, MOE_PRESETS["small"])
    out = dict(values)
    if out.get("arch") == "mixtral" and "moe_experts" not in out:
        out["moe_experts"] = moe["moe_experts"]
    experts = int(out.get("moe_experts") or 0)
    if experts > 0 and "moe_top_k" not in out:
        out["moe_top_k"] = min(moe["moe_top_k"], experts)
    return out


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with any field overridden (``preset("tiny", arch="llama")``)."""
    if name not in PRESETS:
        raise InputError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    return ModelConfig(**with_moe_defaults(name, {**PRESETS[name], **overrides}))


def override(config: ModelConfig, **changes: Any) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise InputError(f"unknown model config field(s): {', '.join(unknown)}")
    return replace(config, **changes)


def check_config(c: ModelConfig) -> None:
    problems = []
    if c.arch not in ARCHES:
        problems.append(f"arch {c.arch!r} (expected {' | '.join(ARCHES)})")
    if c.attention not in ATTENTION_BACKENDS:
        problems.append(f"attention {c.attention!r} (expected {' | '.join(ATTENTION_BACKENDS)})")
    if c.dim % c.n_heads:
        problems.append(f"dim {c.dim} is not a multiple of n_heads {c.n_heads}")
    elif c.head_dim % 2:
        problems.append(f"head size {c.head_dim} is odd (RoPE rotates pairs)")
    if c.n_heads % c.kv_heads:
        problems.append(f"n_heads {c.n_heads} is not a multiple of n_kv_heads {c.kv_heads}")
    if c.moe_experts and not 1 <= c.moe_top_k <= c.moe_experts:
        problems.append(f"moe_top_k {c.moe_top_k} with {c.moe_experts} experts")
    if c.arch == "mixtral" and not c.moe_experts:
        problems.append("arch mixtral needs moe_experts > 0")
    if c.n_codebooks < 1 or c.codebook_size < 2 or c.text_vocab_size < 1:
        problems.append("n_codebooks, codebook_size and text_vocab_size must be positive")
    bad = set(c.capabilities) - {"ar", "nar", "len"}
    if bad or not c.capabilities:
        problems.append(f"capabilities {list(c.capabilities)} (choose from ar, nar, len)")
    if problems:
        raise InputError("model config: " + "; ".join(problems))

