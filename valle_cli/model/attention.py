"""One attention function for the whole codebase: ``attend(q, k, v, mask, causal, backend)``.

Shapes (heads first, like ``F.scaled_dot_product_attention``):

    q     (B, H, Q, Dh)      Q new queries
    k, v  (B, Hkv, S, Dh)    S keys (cached + new); H is a multiple of Hkv (grouped-query attention:
                             query head h reads key/value head h // (H // Hkv))
    mask  (B, 1, Q, S) bool  True = may attend (see ``model/masks.py``); a batch dim of 1 broadcasts
    out   (B, H, Q, Dh)

``causal=True`` (only with ``mask=None``) aligns the queries with the *end* of the keys: query q
sits at absolute position S - Q + q and sees keys 0..S-Q+q. With Q == S this is the ordinary
causal mask; with Q < S it is what a cached decode step needs (bottom-right alignment).
Note that sdpa's own ``is_causal`` is top-left aligned when Q != S, so it is only used for Q == S.

Backends:

    math   explicit q k^T, softmax and p v in float32: slow, the reference the others are tested against
    sdpa   ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks flash / memory-efficient /
           math kernels itself). GQA: with no mask, sdpa's ``enable_gqa`` (torch >= 2.5) avoids copying
           k/v; with a mask the kv heads are expanded, because the fused masked kernels do not take GQA
           and sdpa would fall back to its slow math path.
    flash  ``flash_attn.flash_attn_func`` (layout (B, S, H, Dh), native GQA, bottom-right causal) when
           the ``flash_attn`` package imports, the tensors are CUDA fp16/bf16 and there is no mask.
           flash-attn cannot take an arbitrary mask, so anything else quietly runs on sdpa.
    flex   ``torch.nn.attention.flex_attention`` for masked full-sequence passes (training, validation,
           NAR): the dense mask becomes a block mask once per forward (``block_mask_of``), fully masked
           blocks (padding, the causal upper triangle) are skipped and fully visible ones need no mask
           reads, so the training mask (prefix-causal + bidirectional response) runs in a fused kernel.
           Fused only under ``torch.compile`` (``valle train --compile``); eager flex_attention is a slow
           reference. It has no backward on the CPU (training refuses flex there; gradient-free passes
           use it). Cached decode steps and unmasked passes run on sdpa.

``resolve_backend`` turns the config value (``auto | sdpa | flash | math``) into one of these for a
device. Only this module imports ``flash_attn``, and only lazily inside functions.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from valle_cli.errors import ValleError

BACKENDS = ("math", "sdpa", "flash", "flex")

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


@functools.lru_cache(maxsize=1)
def flash_import_error() -> str | None:
    """None when ``flash_attn`` imports, else the reason (cached: imported at most once)."""
    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # ImportError, or an OSError / RuntimeError from a broken CUDA build
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def flash_available() -> bool:
    return flash_import_error() is None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """``auto`` -> ``flash`` where flash-attn imports and the device is CUDA, else ``sdpa``.

    An explicit ``flash`` that cannot run here raises ValleError; ``sdpa`` and ``math`` pass through.
    """
    is_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "flash" if is_cuda and flash_available() else "sdpa"
    if name == "flash":
        reason = flash_import_error()
        if reason is not None:
            raise ValleError(f"attention backend 'flash' is unavailable (flash_attn does not import: {reason}); "
                             "use attention=auto or sdpa")
        if not is_cuda:
            raise ValleError(f"attention backend 'flash' needs a CUDA device, not {torch.device(device).type}; "
                             "use attention=auto or sdpa")
        return "flash"
    if name in ("sdpa", "math", "flex"):
        return name
    raise ValleError(f"unknown attention backend {name!r} (expected auto | {' | '.join(BACKENDS)})")


def causal_mask(q_len: int, s_len: int, device: torch.device | None = None) -> Tensor:
    """(Q, S) bool, bottom-right aligned: query q (at absolute position S - Q + q) sees keys <= it."""
    q = torch.arange(s_len - q_len, s_len, device=device)
    j = torch.arange(s_len, device=device)
    return j[None, :] <= q[:, None]


def expand_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, S, Dh) -> (B, H, S, Dh): each kv head repeated for its H // Hkv query heads."""
    n_rep = n_heads // x.shape[1]
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
           backend: str = "sdpa", dropout_p: float = 0.0, block_mask: Any = None) -> Tensor:
    """Scaled dot-product attention: q (B, H, Q, Dh), k/v (B, Hkv, S, Dh) -> (B, H, Q, Dh). See module doc.

    ``block_mask``: the flex backend's form of ``mask`` (``block_mask_of(mask)``, built once per forward)."""
    b, h, q_len, dh = q.shape
    h_kv, s_len = k.shape[1], k.shape[2]
    if h % h_kv or v.shape[1] != h_kv or k.shape[0] != b or k.shape[-1] != dh:
        raise ValueError(f"attend: q {tuple(q.shape)} does not fit k {tuple(k.shape)} / v {tuple(v.shape)}")
    if causal and mask is not None:
        raise ValueError("attend: pass either a mask or causal=True, not both")
    if causal and q_len > s_len:
        raise ValueError(f"attend: causal with more queries ({q_len}) than keys ({s_len})")
    if mask is not None and (mask.dim() != 4 or mask.shape[-2:] != (q_len, s_len)):
        raise ValueError(f"attend: mask {tuple(mask.shape)} is not (B, 1, {q_len}, {s_len})")
    if causal and q_len == 1:
        causal = False  # one query at the end of the keys sees all of them: no mask at all

    if backend == "flash" and _flash_usable(q, k, mask):
        return _attend_flash(q, k, v, causal, dropout_p)
    if backend == "flex" and block_mask is not None and dropout_p == 0.0:
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=h != h_kv)
    if backend == "math":
        return _attend_math(q, k, v, mask, causal, dropout_p)
    if backend not in BACKENDS:
        raise ValueError(f"attend: unknown backend {backend!r} (expected {' | '.join(BACKENDS)})")
    return _attend_sdpa(q, k, v, mask, causal, dropout_p)


def block_mask_of(mask: Tensor) -> Any:
    """A flex-attention BlockMask of a (B|1, 1, Q, S) bool mask (True = may attend), for every head."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask[:, 0]  # (B|1, Q, S)
    per_row = dense.shape[0] > 1

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return dense[b if per_row else 0, q, kv]

    return create_block_mask(mask_mod, dense.shape[0] if per_row else None, None, dense.shape[1], dense.shape[2],
                             device=str(mask.device))


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """The softmax attention weights, fp32: q (B, H, Q, Dh), k (B, Hkv, S, Dh) -> (B, H, Q, S)."""
    h, q_len, s_len = q.shape[1], q.shape[2], k.shape[2]
    scores = (q.float() @ expand_kv(k, h).float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Q, S)
    if causal:
        mask = causal_mask(q_len, s_len, q.device)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def _attend_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    v = expand_kv(v, q.shape[1]).float()  # (B, H, S, Dh)
    probs = attention_probs(q, k, mask, causal)  # (B, H, Q, S)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ v).to(q.dtype)  # (B, H, Q, Dh)


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    h, q_len, s_len = q.shape[1], q.shape[2], k.shape[2]
    if causal and q_len != s_len:
        # sdpa's is_causal is top-left aligned for Q != S; we want bottom-right, so spell it out
        mask, causal = causal_mask(q_len, s_len, q.device)[None, None], False
    if h != k.shape[1]:
        if mask is None and _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, enable_gqa=True)
        k, v = expand_kv(k, h), expand_kv(v, h)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def _flash_usable(q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    return (mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and q.shape[-1] <= 256 and flash_available())


def _attend_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float) -> Tensor:
    from flash_attn import flash_attn_func

    # flash-attn wants (B, S, H, Dh); it handles Hkv < H itself and aligns causal bottom-right (>= 2.1),
    # which is exactly our convention for Q < S
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                          causal=causal)
    return out.transpose(1, 2)  # (B, H, Q, Dh)
