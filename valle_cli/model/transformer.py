"""Our own backbone, in the style of Llama 4: embeddings in, normalised hidden states out.

    x -> [ h = x + Attention(RMSNorm(x)) ; x = h + FFN-or-MoE(RMSNorm(h)) ] * n_layers -> RMSNorm

The caller owns the embeddings and output heads (``model/__init__.py`` describes the interface).

* RoPE: cos/sin tables of ``max_positions`` rows, indexed by the explicit ``positions`` (B, T) so
  every row of a batch has its own positions (left padding, positions restarting per segment).
  Rotation pairs dimension i with i + Dh/2 (the "rotate half" layout). With ``rope_scaling > 0`` the
  frequencies are rescaled llama-3 style: long wavelengths slowed down by the factor, short ones kept,
  a smooth blend between.
* Attention: GQA (``n_kv_heads``), optional QK-norm (RMSNorm per head on q and k, before RoPE),
  NoPE layers (``config.uses_rope(layer)`` False: no rotation at all), and with ``attention_chunk > 0``
  the RoPE layers attend only within chunks of that many cache slots (``masks.chunked_local``) while
  the NoPE layers stay global (Llama 4's iRoPE). Chunks count slots, not ``positions``, so a left-padded
  row's chunk boundaries move with its padding.
* FFN: SwiGLU ``w2(silu(w1 x) * w3 x)``. MoE layers (``config.is_moe_layer``): a router, top-k softmax
  gates renormalised over the chosen k, experts as stacked weight tensors, an always-on shared expert,
  and a Switch-style load-balancing loss returned as ``aux_loss``.
* KV cache: per-layer buffers (B, Hkv, max_len, Dh) allocated once and written in place, so decoding
  allocates no new cache memory per step. ``forward`` attends over the filled slots only, a view
  (B, Hkv, length + T, Dh), so the attention shapes grow by one every step (cheapest eagerly).
  ``decode`` is the fixed-shape step: keys written at slot indices given as a tensor, every query
  attending over the whole buffer under a mask, so nothing changes shape from step to step and
  ``torch.compile(fullgraph=True)`` / CUDA graphs capture it once (``generation.generate.step_function``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from valle_cli.model.attention import attend, attention_probs, block_mask_of, causal_mask, resolve_backend
from valle_cli.model.backbone_output import BackboneOutput
from valle_cli.model.config import ModelConfig
from valle_cli.model.masks import chunked_local


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32 (the mean of squares overflows / loses precision in fp16 / bf16), in one
        # fused op rather than five small ones: a decode step runs 2 n_layers + 1 of these
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


# -- rotary position embeddings


def rope_frequencies(config: ModelConfig) -> Tensor:
    """(Dh/2,) float64 inverse frequencies on the CPU, llama-3 scaled when ``config.rope_scaling > 0``."""
    dh = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float64, device="cpu") / dh))
    if config.rope_scaling > 0:
        factor = config.rope_scaling
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        original = config.rope_original_positions
        if high <= low:
            raise ValueError(f"rope_high_freq_factor {high} must exceed rope_low_freq_factor {low}")
        wavelen = 2 * math.pi / inv_freq
        # high frequencies (wavelength < original / high) unchanged; low ones (> original / low) divided
        # by the factor; in between a linear blend in original / wavelength
        smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables (max_positions, Dh) float32, looked up by an explicit positions tensor.

    Laid out for ``apply_rope``'s three ops: ``cos`` is the angles' cosines twice over, ``sin`` their
    sines negated for the first half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) is then
    ``x * cos + roll(x, Dh/2) * sin``.

    The tables are derived data (non-persistent buffers, never in a checkpoint), so they are rebuilt
    whenever the module is moved or cast: ``model.to(bfloat16)`` keeps them float32 (bf16 cos/sin are
    visibly wrong at large angles), and ``to_empty`` after a meta-device build gets real values.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        device = torch.get_default_device()  # honours `with torch.device("meta"):`
        cos, sin = self._tables(device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # float64 on the CPU (positions * frequency reaches thousands of radians), then moved
        positions = torch.arange(self.config.max_positions, dtype=torch.float64, device="cpu")
        angles = positions[:, None] * rope_frequencies(self.config)  # (P, Dh/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat((cos, cos), -1).float().to(device), torch.cat((-sin, sin), -1).float().to(device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) long -> cos, sin (B, 1, T, Dh) float32, broadcasting over heads."""
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (x_i, x_{i + Dh/2}) pairs: x (B, H, T, Dh), cos/sin (B, 1, T, Dh) of ``RotaryEmbedding``."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


# -- attention, feed-forward, mixture of experts


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.use_rope = config.uses_rope(layer)
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wqkv: nn.Module | None = None  # fuse_projections(): wq, wk, wv as one matrix, for decoding
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = nn.Dropout(config.dropout)
        # Guided attention (model/guided_attention.py): with probe_heads = h > 0, a
        # full-sequence forward (training, validation; not a cached decode step) also keeps the attention
        # weights of heads 0..h-1 in ``probed`` (B, h, T, S), for a loss on them.
        self.probe_heads = 0
        self.probed: Tensor | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, backend: str,
                kv: tuple[Tensor, Tensor, int | Tensor] | None = None, block_mask: Any = None) -> Tensor:
        """x (B, T, D); mask (B|1, 1, T, S) or None = causal; kv = (k_buf, v_buf, start) of a cache.

        ``start`` an int: the new keys go to slots [start, start + T) and the queries attend over the
        filled slots [0, start + T). A (T,) long tensor of slots: the fixed-shape step (Transformer.decode),
        which writes there and attends over the whole buffer, S = max_len, under the mask."""
        b, t, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.probe_heads and kv is None:
            h = self.probe_heads  # the weights sdpa uses for these heads, recomputed so a loss can reach q and k
            kv_heads = k[:, [i * self.n_kv_heads // self.n_heads for i in range(h)]]  # (B, h, T, Dh)
            self.probed = attention_probs(q[:, :h], kv_heads, mask, causal=mask is None)  # (B, h, T, T)
        if kv is not None:
            k_buf, v_buf, start = kv
            if isinstance(start, Tensor):  # fixed shape: write at the slots, read the whole buffer
                k_buf.index_copy_(2, start, k)
                v_buf.index_copy_(2, start, v)
                k, v = k_buf, v_buf  # (B, Hkv, max_len, Dh)
            else:  # write the new keys / values in place at [start, start + T), then read [0, start + T)
                k_buf[:, :, start:start + t].copy_(k)
                v_buf[:, :, start:start + t].copy_(v)
                k, v = k_buf[:, :, :start + t], v_buf[:, :, :start + t]  # (B, Hkv, S, Dh) views
        y = attend(q, k, v, mask=mask, causal=mask is None, backend=backend, block_mask=block_mask)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.dropout(self.wo(y))

    def fuse_projections(self) -> bool:
        """Replace wq, wk, wv by one matrix wqkv (one matrix product instead of three per call); for
        decoding, where the step is bound by reading the weights. Plain nn.Linear only (not LoRA)."""
        if self.wqkv is not None or not plain_linears(self.wq, self.wk, self.wv):
            return False
        self.wqkv = fused_linear(self.wq, self.wk, self.wv)
        del self.wq, self.wk, self.wv
        return True


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w13: nn.Module | None = None  # fuse_projections(): w1 and w3 as one matrix, for decoding
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, F) each
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.dropout(self.w2(F.silu(gate) * up))

    def fuse_projections(self) -> bool:
        """Replace w1 and w3 by one matrix w13 (see Attention.fuse_projections)."""
        if self.w13 is not None or not plain_linears(self.w1, self.w3):
            return False
        self.w13 = fused_linear(self.w1, self.w3)
        del self.w1, self.w3
        return True


def plain_linears(*modules: nn.Module) -> bool:
    """Bias-free nn.Linear layers, nothing wrapped (LoRA) or quantized: what fused_linear can join."""
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


def fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One bias-free nn.Linear whose output is the given ones' outputs side by side."""
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)  # (sum of outputs, D)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight.data.copy_(weight)
    return fused.requires_grad_(any(m.weight.requires_grad for m in linears))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus an optional always-on shared expert.

    The experts are stacked tensors w1, w3 (E, D, F) and w2 (E, F, D). Two ways to evaluate them,
    same result: few tokens (a decode step: N * k <= E) gather each token's k expert matrices, which
    reads no more weights than the experts it uses and has no data-dependent shapes; otherwise the
    token-expert pairs are sorted by expert and each expert runs once over its tokens (one host sync
    per layer for the counts, then index_select / index_add).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.moe_experts, config.moe_top_k
        dim, hidden = config.dim, config.hidden_dim
        self.router = nn.Linear(dim, self.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(self.n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(self.n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(self.n_experts, dim, hidden))
        self.shared = FeedForward(dim, hidden) if config.moe_shared_expert else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, D), token_mask (B, T) bool (False = padding, left out of the loss) -> (B, T, D), aux ()."""
        b, t, d = x.shape
        xf = x.reshape(b * t, d)  # (N, D)
        probs = self.router(xf).float().softmax(dim=-1)  # (N, E), float32 for a stable softmax
        gates, experts = probs.topk(self.top_k, dim=-1)  # (N, k) each
        gates = (gates / gates.sum(dim=-1, keepdim=True)).to(x.dtype)
        if b * t * self.top_k <= self.n_experts:
            routed = self._gathered(xf, gates, experts)
        else:
            routed = self._grouped(xf, gates, experts)
        out = routed.view(b, t, d)
        if self.shared is not None:
            out = out + self.shared(x)
        return self.dropout(out), self._balance_loss(probs, experts, token_mask)

    def _gathered(self, xf: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
        w1, w3, w2 = self.w1[experts], self.w3[experts], self.w2[experts]  # (N, k, D, F), (N, k, F, D)
        h = F.silu(torch.einsum("nd,nkdf->nkf", xf, w1)) * torch.einsum("nd,nkdf->nkf", xf, w3)  # (N, k, F)
        y = torch.einsum("nkf,nkfd->nkd", h, w2)  # (N, k, D)
        return (y * gates[..., None]).sum(dim=1)  # (N, D)

    def _grouped(self, xf: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
        n = xf.shape[0]
        flat_expert = experts.reshape(-1)  # (N * k,)
        order = flat_expert.argsort(stable=True)  # token-expert pairs grouped by expert
        tokens = torch.arange(n, device=xf.device).repeat_interleave(self.top_k)[order]  # (N * k,)
        weights = gates.reshape(-1)[order]  # (N * k,)
        counts = torch.bincount(flat_expert, minlength=self.n_experts).tolist()  # the one host sync
        out = torch.zeros_like(xf)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            idx = tokens[start:start + count]
            h = xf.index_select(0, idx)  # (n_e, D)
            y = (F.silu(h @ self.w1[e]) * (h @ self.w3[e])) @ self.w2[e]  # (n_e, D)
            out.index_add_(0, idx, y * weights[start:start + count, None])
            start += count
        return out

    def _balance_loss(self, probs: Tensor, experts: Tensor, token_mask: Tensor | None) -> Tensor:
        """Switch / Mixtral load balancing: E * sum_e (share of routed assignments to e) * (mean prob of e).

        Equals 1 for a perfectly uniform router; padding tokens (token_mask False) are left out.
        """
        n = probs.shape[0]
        w = probs.new_ones(n) if token_mask is None else token_mask.reshape(n).to(probs.dtype)  # (N,)
        chosen = F.one_hot(experts, self.n_experts).to(probs.dtype).sum(dim=1)  # (N, E): 1 where routed
        n_tokens = w.sum().clamp(min=1.0)
        fraction = (w[:, None] * chosen).sum(dim=0) / (n_tokens * self.top_k)  # (E,), sums to 1
        mean_prob = (w[:, None] * probs).sum(dim=0) / n_tokens  # (E,)
        return self.n_experts * (fraction * mean_prob).sum()


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.feed_forward = MoE(config) if self.is_moe else FeedForward(config.dim, config.hidden_dim, config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, backend: str,
                kv: tuple[Tensor, Tensor, int] | None = None, token_mask: Tensor | None = None,
                block_mask: Any = None) -> tuple[Tensor, Tensor]:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, backend, kv, block_mask)
        if self.is_moe:
            y, aux = self.feed_forward(self.ffn_norm(x), token_mask)
        else:
            y, aux = self.feed_forward(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + y, aux


# -- the preallocated KV cache


class KVCache:
    """Preallocated keys / values per layer, (B, Hkv, max_len, Dh) each; ``length`` slots are filled.

    Create it and use it under the same grad mode (e.g. both inside ``torch.inference_mode()``). To
    ``torch.compile`` a decode step, pass the cache as an argument of the compiled function: its
    ``length`` then becomes a dynamic int after one recompile instead of a constant baked into each graph.
    """

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def crop(self, n: int) -> None:
        """Forget everything after the first n tokens (n >= length: nothing to forget). Buffers are kept."""
        if n < 0:
            raise ValueError(f"KVCache.crop({n}): n must be >= 0")
        self.length = min(n, self.length)


# -- the backbone


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # normal(0.02) everywhere; the projections that write into the residual stream (wo, w2) scaled by
        # 1/sqrt(2 n_layers) so the residual's variance does not grow with depth (GPT-2)
        std = 0.02
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue  # RMSNorm scales stay at 1
            is_out = name.endswith(("wo.weight", "w2.weight")) or name.endswith("feed_forward.w2")
            nn.init.normal_(p, mean=0.0, std=out_std if is_out else std)

    def fuse_projections(self) -> int:
        """Fuse every layer's q/k/v and gate/up projections for decoding (an inference-only layout: the
        state_dict changes, so fuse after loading a checkpoint, never before saving one). Returns the
        matrices fused away; the outputs are the unfused model's up to float rounding."""
        fused = 0
        for layer in self.layers:
            fused += 2 * layer.attention.fuse_projections()
            if not layer.is_moe:
                fused += layer.feed_forward.fuse_projections()
        return fused

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        if device is None or dtype is None:
            p = next(self.parameters())
            device, dtype = device or p.device, dtype or p.dtype
        return KVCache(c.n_layers, batch, c.kv_heads, max_len, c.head_dim, device, dtype)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                *, token_mask: Tensor | None = None) -> BackboneOutput:
        """x (B, T, D), positions (B, T) long, mask (B|1, 1, T, S) bool or None (= causal), S = cache.length + T.

        token_mask (B, T) bool: False marks padding tokens, left out of the router's load-balancing loss.
        """
        c = self.config
        b, t, _ = x.shape
        start = 0 if cache is None else cache.length
        s = start + t
        if positions.shape != (b, t):
            raise ValueError(f"positions {tuple(positions.shape)} do not match x {tuple(x.shape)}")
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (t, s)
                                 or mask.shape[0] not in (1, b)):
            raise ValueError(f"mask {tuple(mask.shape)} is not ({b}, 1, {t}, {s})")
        if cache is not None:
            if cache.batch != b:
                raise ValueError(f"the cache holds batch {cache.batch}, the input has batch {b}")
            if s > cache.max_len:
                raise ValueError(f"the KV cache is full: {start} cached + {t} new tokens > max_len {cache.max_len}")
        backend = resolve_backend(c.attention, x.device)

        cos, sin = self.rope(positions)  # (B, 1, T, Dh)
        local_mask = None
        if c.attention_chunk > 0:
            full = causal_mask(t, s, x.device)[None, None] if mask is None else mask  # (B|1, 1, T, S)
            local_mask = chunked_local(full, c.attention_chunk, query_offset=start)

        blocks: dict[int, Any] = {}  # flex: a block mask per distinct mask, built once for every layer
        # FlexAttention has no backward on the CPU: there it serves gradient-free passes only
        if backend == "flex" and cache is None and mask is not None and (x.is_cuda or not torch.is_grad_enabled()):
            blocks = {id(m): block_mask_of(m) for m in (mask, local_mask) if m is not None}
        use_checkpoint = c.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            layer_mask = local_mask if local_mask is not None and c.uses_rope(i) else mask
            kv = None if cache is None else (cache.k[i], cache.v[i], start)
            block = blocks.get(id(layer_mask))
            if use_checkpoint:
                x, layer_aux = checkpoint(layer, x, cos, sin, layer_mask, backend, kv, token_mask, block,
                                          use_reentrant=False)
            else:
                x, layer_aux = layer(x, cos, sin, layer_mask, backend, kv, token_mask, block)
            aux = aux + layer_aux
        if cache is not None:
            cache.length = s
        return BackboneOutput(hidden=self.norm(x), aux_loss=aux * c.router_aux_loss)

    def decode(self, x: Tensor, positions: Tensor, slots: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        """The fixed-shape decode step (gpt-fast's layout): hidden states (B, T, D) of T new tokens.

        x (B, T, D), positions (B, T) long, slots (T,) long: the cache slots the new keys / values go to,
        mask (B|1, 1, T, max_len) bool over the whole cache (True = may attend; the caller marks the filled
        slots, these included). Every query attends over all ``cache.max_len`` slots, so no shape and no
        Python value changes from one step to the next: ``torch.compile(fullgraph=True)`` traces it once
        and CUDA graphs can replay it. ``cache.length`` is the caller's to keep (untouched here).
        """
        c = self.config
        b, t, _ = x.shape
        if mask.shape[-2:] != (t, cache.max_len) or slots.shape != (t,) or cache.batch != b:
            raise ValueError(f"decode: mask {tuple(mask.shape)} / slots {tuple(slots.shape)} do not fit "
                             f"{t} new tokens of batch {b} and a cache of {cache.batch} x {cache.max_len} slots")
        backend = resolve_backend(c.attention, x.device)
        cos, sin = self.rope(positions)  # (B, 1, T, Dh)
        local_mask = None
        if c.attention_chunk > 0:  # the RoPE layers see only the query's chunk of slots
            local_mask = chunked_local(mask, c.attention_chunk, query_offset=slots)
        for i, layer in enumerate(self.layers):
            layer_mask = local_mask if local_mask is not None and c.uses_rope(i) else mask
            x, _ = layer(x, cos, sin, layer_mask, backend, (cache.k[i], cache.v[i], slots))
        return self.norm(x)
