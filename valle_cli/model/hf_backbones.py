"""The transformers backbones: ``LlamaModel`` and ``MixtralModel`` behind our backbone interface.

Built from a ``ModelConfig`` with random weights (HF's own init; nothing is downloaded). Our fields
map onto the HF config like this:

    dim -> hidden_size              n_layers -> num_hidden_layers      n_heads -> num_attention_heads
    kv_heads -> num_key_value_heads hidden_dim -> intermediate_size    norm_eps -> rms_norm_eps
    max_positions -> max_position_embeddings                           dropout -> attention_dropout
    rope_theta, rope_scaling > 0    -> rope_parameters {"rope_type": "llama3", "factor", "low_freq_factor",
                                       "high_freq_factor", "original_max_position_embeddings"}
    attention   math -> "eager", sdpa -> "sdpa", flash -> "flash_attention_2", auto -> flash where
                flash_attn imports and CUDA is there, else sdpa (see ``model/attention.resolve_backend``)
    mixtral     moe_experts -> num_local_experts, moe_top_k -> num_experts_per_tok,
                router_aux_loss -> router_aux_loss_coef (every layer is MoE, no shared expert)

We always feed ``inputs_embeds``, so the HF token embedding is a 1-row stub. ``dropout`` only
reaches the attention probabilities (HF Llama has no residual dropout). Our-arch-only features
(qk_norm, nope_every, attention_chunk) raise rather than being silently ignored.

Masks. transformers (5.x) passes a 4-D ``attention_mask`` straight through to the attention
function, so we translate ours, (B, 1, Q, S) bool with True = may attend, per backend: sdpa takes
the bool mask as is; eager *adds* the mask to the scores, so it gets 0 / dtype-min floats (a bool
mask there would silently add 1.0). ``mask=None`` means causal; we then hand over a 2-D all-ones
padding mask instead of None, because with no mask and no cache transformers reads non-contiguous
``position_ids`` (ours restart at 0 in every segment) as *packed sequences* and blocks attention
between them. FlashAttention-2 cannot take a 4-D mask, so with ``flash`` any call that has a mask
(and a batch-of-one call whose positions would look packed) runs on sdpa instead.

Caches. ``new_cache`` wraps a ``DynamicCache`` (grows by concatenation; a ``StaticCache`` would
want masks padded to its full length). transformers 5.x tracks the write position inside the
cache itself (there is no ``cache_position`` argument any more): a forward with the cache writes
at [length, length + T) and the mask must cover S = length + T keys. ``crop(n)`` maps onto HF's
``crop(-removed)`` (a positive argument is an error there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from valle_cli.errors import ValleError
from valle_cli.model.attention import resolve_backend
from valle_cli.model.backbone_output import BackboneOutput
from valle_cli.model.config import ModelConfig

HF_IMPLEMENTATIONS = {"math": "eager", "sdpa": "sdpa", "flash": "flash_attention_2"}


def hf_attn_implementation(config: ModelConfig) -> str:
    """Our ``attention`` field -> the transformers ``attn_implementation`` (ValleError if flash cannot run)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HF_IMPLEMENTATIONS[resolve_backend(config.attention, device)]


def hf_attention_mask(mask: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """Our (B, 1, Q, S) bool mask (True = may attend) -> the 4-D mask the HF attention function wants."""
    if implementation == "eager":
        # eager_attention_forward computes scores + mask: 0 where allowed, the most negative float elsewhere
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return mask  # sdpa: handed to F.scaled_dot_product_attention, where a bool True means attend


def hf_config(config: ModelConfig, implementation: str) -> Any:
    """The LlamaConfig / MixtralConfig for our config (no download)."""
    from transformers import LlamaConfig, MixtralConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling > 0:
        rope = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": config.rope_scaling,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_positions,
        }
    common = dict(
        vocab_size=1,  # never used: we pass inputs_embeds
        hidden_size=config.dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.hidden_dim,
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_positions,
        rope_parameters=rope,
        attention_dropout=config.dropout,
        use_cache=False,  # the config default (True) would build a throwaway cache on every forward
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=implementation,
    )
    if config.arch == "llama":
        return LlamaConfig(**common)
    return MixtralConfig(
        **common,
        num_local_experts=config.moe_experts,
        num_experts_per_tok=config.moe_top_k,
        router_aux_loss_coef=config.router_aux_loss,
        sliding_window=None,
    )


def check_supported(config: ModelConfig) -> None:
    """Raise for settings the HF arches cannot honour, instead of ignoring them."""
    unsupported = []
    if config.arch not in ("llama", "mixtral"):
        unsupported.append(f"arch {config.arch!r}")
    if config.qk_norm:
        unsupported.append("qk_norm")
    if config.nope_every:
        unsupported.append("nope_every")
    if config.attention_chunk:
        unsupported.append("attention_chunk")
    if config.attention == "flex":
        unsupported.append("attention flex")
    if config.arch == "llama" and config.moe_experts:
        unsupported.append("moe_experts (use arch mixtral)")
    if config.arch == "mixtral" and config.moe_every != 1:
        unsupported.append("moe_every != 1 (every mixtral layer is MoE)")
    if unsupported:
        raise ValleError(f"arch {config.arch} does not support {', '.join(unsupported)}; use arch transformer")


class HFCache:
    """A transformers ``DynamicCache`` plus the token count our interface exposes."""

    def __init__(self, inner: Any, batch: int, max_len: int):
        self.inner = inner  # transformers DynamicCache: per layer keys/values (B, Hkv, length, Dh)
        self.batch = batch
        self.max_len = max_len
        self.length = 0

    def crop(self, n: int) -> None:
        """Forget everything after the first ``n`` tokens."""
        if n < 0:
            raise ValueError(f"crop({n}): n must be >= 0")
        if n < self.length:
            self.inner.crop(n - self.length)  # HF: a negative count of tokens to drop from the end
            self.length = n


class HFBackbone(nn.Module):
    """``LlamaModel`` / ``MixtralModel`` as a backbone: forward(x, positions, mask, cache) -> BackboneOutput."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_supported(config)
        from transformers import LlamaModel, MixtralModel

        self.config = config
        self.implementation = hf_attn_implementation(config)
        self.is_moe = config.arch == "mixtral"
        model_class = MixtralModel if self.is_moe else LlamaModel
        self.model = model_class(hf_config(config, self.implementation))
        if config.gradient_checkpointing:
            # context_fn re-applies this call's attention backend when the backward pass recomputes a layer
            kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> HFCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (allocated as it fills)."""
        from transformers import DynamicCache

        # device / dtype come from the keys written on the first forward
        return HFCache(DynamicCache(config=self.model.config), batch, max_len)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None = None, cache: HFCache | None = None,
                token_mask: Tensor | None = None) -> BackboneOutput:
        """x (B, T, D), positions (B, T) long, mask (B, 1, T, S) bool or None (causal) -> hidden (B, T, D).

        token_mask (B, T) bool marks the real (non-padding) tokens for the router loss; None = all.
        """
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        s = past + t  # keys this forward attends over: cached + new
        if cache is not None:
            if cache.batch != b:
                raise ValueError(f"cache holds {cache.batch} rows, the input {b}")
            if s > cache.max_len:
                raise ValleError(f"KV cache overflow: {past} cached + {t} new tokens > max_len {cache.max_len}")
            if self.training and self.config.gradient_checkpointing and torch.is_grad_enabled():
                raise ValueError("a cached forward with gradient checkpointing needs eval() or torch.no_grad()")

        implementation = self._implementation_for(mask, positions)
        if mask is None:
            # causal: a 2-D all-valid padding mask, not None (None + restarting positions = "packed sequences")
            attention_mask = torch.ones(b, s, dtype=torch.bool, device=x.device)  # (B, S)
        else:
            if mask.shape != (b, 1, t, s) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be ({b}, 1, {t}, {s}) bool, got {tuple(mask.shape)} {mask.dtype}")
            attention_mask = hf_attention_mask(mask, implementation, x.dtype)  # (B, 1, T, S)

        extra: dict[str, Any] = {}
        want_router_loss = self.is_moe and self.training and self.config.router_aux_loss > 0
        if want_router_loss:
            extra["output_router_logits"] = True
        with self._use_implementation(implementation):
            out = self.model(
                inputs_embeds=x,
                position_ids=positions,
                attention_mask=attention_mask,
                cache=cache.inner if cache is not None else None,
                use_cache=cache is not None,
                **extra,
            )
        if cache is not None:
            cache.length = s

        aux_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        if want_router_loss:
            aux_loss = self._router_loss(out.router_logits, token_mask) * self.config.router_aux_loss
        return BackboneOutput(hidden=out.last_hidden_state, aux_loss=aux_loss)

    def _router_loss(self, router_logits: tuple[Tensor, ...], token_mask: Tensor | None) -> Tensor:
        """Switch-transformer load balancing over all layers; router_logits: one (B*T, E) tensor per layer."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        # token_mask (B, T) flattens in the same row order as the router's (B*T, E) logits
        valid = token_mask.to(torch.float32) if token_mask is not None else None
        loss = load_balancing_loss_func(tuple(router_logits), self.config.moe_experts, self.config.moe_top_k, valid)
        return torch.as_tensor(loss, dtype=torch.float32, device=router_logits[0].device)

    def _implementation_for(self, mask: Tensor | None, positions: Tensor) -> str:
        """FlashAttention-2 only for unmasked calls it gets right; everything else runs on sdpa."""
        if self.implementation != "flash_attention_2":
            return self.implementation
        if mask is not None:
            return "sdpa"  # FA2 takes at most a 2-D padding mask, never our 4-D one
        # batch of one + positions that are not one run: transformers' FA2 would split them as packed sequences
        if positions.shape[0] == 1 and bool((positions.diff(dim=-1) != 1).any()):
            return "sdpa"
        return self.implementation

    @contextlib.contextmanager
    def _use_implementation(self, implementation: str) -> Iterator[None]:
        """Temporarily switch the attention function every HF layer looks up from the shared config."""
        hf = self.model.config
        saved = hf._attn_implementation
        hf._attn_implementation = implementation
        try:
            yield
        finally:
            hf._attn_implementation = saved

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch.utils.checkpoint context_fn: the recompute runs with the backend of the original call."""
        return contextlib.nullcontext(), self._use_implementation(self.model.config._attn_implementation)
