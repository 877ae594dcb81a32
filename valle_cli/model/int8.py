"""Weight-only int8 linear layers for decoding (gpt-fast's int8 path).

A cached decode step multiplies one vector by every weight matrix, so it is bound by reading the
weights: 20 MB of fp32 per frame at the small preset. Stored as int8 with one scale per output row
(symmetric absmax: ``w ~ q * s``, q in -127..127), they are a quarter of that.

    y = x @ (q * s)^T + b  =  (x @ q^T) * s + b

On the CPU the product runs in torch's int8-weight kernel (``torch._weight_int8pack_mm``: bf16
activations, the scales applied in the kernel; 1.5-2x an fp32 product of the same shape on one
core). It needs ``in_features`` to be a multiple of 32 (measured: other widths give wrong results),
so other layers, products of 16 rows or more (full-sequence passes), and other devices dequantise
to the activations' dtype and call ``F.linear`` (under ``torch.compile`` on a GPU the dequantisation
fuses into the product, as in gpt-fast).

Activations go into the CPU kernel as bf16, so outputs differ from fp32 by more than the weights'
rounding: ``benchmarks/int8_agreement.py`` measures the greedy token agreement with fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

KERNEL_BLOCK = 32  # torch._weight_int8pack_mm: in_features must be a multiple of this
# The kernel's cost grows linearly with the rows (a matrix-vector product per row): from 16 rows on,
# dequantising and one fp32 matrix product is as fast (one core, 768 x 256: 122 against 113 us at 16
# rows, 1,413 against 926 at 226), so full-sequence passes (prefill, NAR) take that path.
KERNEL_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """An nn.Linear with its weight stored as int8 rows and per-row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (N, K)
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (N,)
        self.register_buffer("weight", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)  # fp32; the CPU kernel gets a bf16 copy
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def uses_kernel(self, x: Tensor) -> bool:
        rows = x.numel() // max(x.shape[-1], 1)
        return x.device.type == "cpu" and self.in_features % KERNEL_BLOCK == 0 and rows < KERNEL_MAX_ROWS

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        if self.uses_kernel(x):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scales_bf16)  # (M, N) bf16
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized(self) -> Tensor:
        """(N, K) float32: the weight this layer stands for."""
        return self.weight.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(module: nn.Module) -> list[str]:
    """Replace every plain nn.Linear under ``module`` by an Int8Linear, in place; returns their names.

    Inference only: the layers have no gradient, and the state_dict changes (never save it as a checkpoint).
    """
    replaced = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Linear:
                setattr(child, attr, Int8Linear(sub))
                replaced.append(f"{name}.{attr}" if name else attr)
    return replaced
