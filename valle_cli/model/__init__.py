"""The codec language model: config, backbones, the unified AR + NAR + NAR-len wrapper, LoRA.

Every backbone follows one small interface (see ``model/attention.py`` for the mask):

    backbone = build_backbone(config)                 # nn.Module
    out = backbone(x, positions, mask, cache=None)    # x (B, T, D) embeddings, positions (B, T) long,
                                                      # mask (B, 1, T, S) bool (True = may attend) or None
    out.hidden                                        # (B, T, D), after the final norm
    out.aux_loss                                      # scalar tensor: router load-balancing loss (0 if dense)
    cache = backbone.new_cache(batch, max_len, device, dtype)
    cache.length                                      # tokens held; a forward with a cache writes at
                                                      # [length, length + T) and advances it; S = length + T
    cache.crop(n)                                     # forget everything after the first n tokens
"""

from __future__ import annotations

from typing import Any


def build_backbone(config: Any) -> Any:
    """The backbone named by ``config.arch``, randomly initialised (no download)."""
    if config.arch == "transformer":
        from valle_cli.model.transformer import Transformer

        return Transformer(config)
    from valle_cli.model.hf_backbones import HFBackbone

    return HFBackbone(config)
