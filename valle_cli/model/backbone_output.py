"""What every backbone returns (ours in ``model/transformer.py``, the HF ones in ``model/hf_backbones.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class BackboneOutput:
    hidden: Tensor  # (B, T, D) hidden states after the final norm
    aux_loss: Tensor  # () float: weighted router load-balancing loss, summed over MoE layers; 0 for dense models
