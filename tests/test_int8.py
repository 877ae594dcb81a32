"""Weight-only int8 linear layers (model/int8.py): the CPU kernel, its fallback and the model swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from valle_cli.model.config import preset
from valle_cli.model.int8 import KERNEL_BLOCK, KERNEL_MAX_ROWS, Int8Linear, quantize_int8
from valle_cli.model.valle import CodecLM


@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize(("k", "n"), [(64, 7), (96, 1025), (200, 48)])
@torch.no_grad()
def test_int8_linear_matches_its_dequantized_weight(rows: int, k: int, n: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=n == 48)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    assert (q.dequantized() - linear.weight).abs().max() <= q.scales.max() / 2 + 1e-7  # rounding, no more
    x = torch.randn(2, rows, k)
    reference = x @ q.dequantized().T + (0 if linear.bias is None else linear.bias)  # (2, rows, n)
    y = q(x)
    assert y.shape == (2, rows, n) and y.dtype == torch.float32
    assert q.uses_kernel(x) == (k % KERNEL_BLOCK == 0 and 2 * rows < KERNEL_MAX_ROWS)
    # the CPU kernel takes bf16 activations: within bf16 rounding of the exact product
    torch.testing.assert_close(y, reference, atol=0.02 * reference.abs().max().item(), rtol=0.0)
    assert (y - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


@torch.no_grad()
def test_quantize_int8_swaps_every_plain_linear_and_the_model_still_decodes_close() -> None:
    torch.manual_seed(0)
    model = CodecLM(preset("tiny", n_codebooks=2, codebook_size=64, text_vocab_size=32)).eval()
    x = torch.randn(1, 9, 64)
    pos = torch.arange(9)[None]
    expected = model.head_ar(model.backbone(x, pos).hidden)
    names = quantize_int8(model)
    assert "backbone.layers.0.attention.wq" in names and "head_ar" in names
    assert not any(type(m) is nn.Linear for m in model.modules())
    got = model.head_ar(model.backbone(x, pos).hidden)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
