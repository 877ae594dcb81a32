"""Our transformer backbone: masks, positions, padding, the static KV cache, MoE, checkpointing, backends."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from valle_cli.model import build_backbone
from valle_cli.model.attention import block_mask_of
from valle_cli.model.backbone_output import BackboneOutput
from valle_cli.model.config import ModelConfig, preset
from valle_cli.model.masks import decode_step_mask, prefix_bidirectional_mask
from valle_cli.model.transformer import MoE, Transformer, rope_frequencies

ATOL = 1e-5
DENSE = preset("tiny")
# every optional feature at once: QK-norm, a NoPE layer, chunked local attention, llama-3 RoPE scaling, MoE
FEATURES = preset("tiny", qk_norm=True, nope_every=2, attention_chunk=4, rope_scaling=8.0, moe_experts=4, moe_every=1)
CONFIGS = pytest.mark.parametrize("config", [DENSE, FEATURES], ids=["dense", "features"])


def model_for(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval()


def inputs(b: int, t: int, dim: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, dim, generator=g)
    positions = torch.arange(t).expand(b, t)
    return x, positions


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@CONFIGS
def test_output_shapes(config: ModelConfig) -> None:
    model = model_for(config)
    x, pos = inputs(3, 9)
    out = model(x, pos)
    assert isinstance(out, BackboneOutput)
    assert out.hidden.shape == (3, 9, 64) and out.hidden.dtype == torch.float32
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss)


def test_build_backbone_and_lazy_import() -> None:
    assert isinstance(build_backbone(DENSE), Transformer)
    code = "import sys, valle_cli, valle_cli.model; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@CONFIGS
@torch.no_grad()
def test_causal(config: ModelConfig) -> None:
    model = model_for(config)
    x, pos = inputs(2, 12)
    base = model(x, pos).hidden
    x2 = x.clone()
    x2[:, 7] += 1.0
    changed = model(x2, pos).hidden
    close(changed[:, :7], base[:, :7])
    assert (changed[:, 7:] - base[:, 7:]).abs().amax() > 1e-3
    # an explicit all-valid causal mask is the same as mask=None
    causal = prefix_bidirectional_mask(torch.ones(2, 12, dtype=torch.bool), torch.full((2,), 12))
    close(model(x, pos, causal).hidden, base)


@CONFIGS
@torch.no_grad()
def test_bidirectional_response(config: ModelConfig) -> None:
    model = model_for(config)
    x, pos = inputs(2, 12)
    mask = prefix_bidirectional_mask(torch.ones(2, 12, dtype=torch.bool), torch.full((2,), 6))
    base = model(x, pos, mask).hidden
    x2 = x.clone()
    x2[:, 9] += 1.0
    changed = model(x2, pos, mask).hidden
    close(changed[:, :6], base[:, :6])  # the causal prefix never sees the response
    # every response position sees position 9 (with chunks of 4 through the global NoPE layer at least)
    diff = (changed - base).abs().amax(dim=-1)  # (B, T)
    assert (diff[:, 6:] > 1e-4).all()


def cached_steps(model: Transformer, x: torch.Tensor, pos: torch.Tensor, prefill: int, step: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then feed ``step`` at a time with decode masks: the hidden states, (B, T, D)."""
    b, t, _ = x.shape
    valid = torch.ones(b, t, dtype=torch.bool) if valid is None else valid
    cache = model.new_cache(b, t + 2, x.device, x.dtype)
    first = prefix_bidirectional_mask(valid[:, :prefill], torch.full((b,), prefill))
    outs = [model(x[:, :prefill], pos[:, :prefill], first, cache=cache).hidden]
    assert cache.length == prefill
    for s in range(prefill, t, step):
        e = min(s + step, t)
        mask = decode_step_mask(valid[:, :e], e - s)  # (B, 1, e - s, e)
        outs.append(model(x[:, s:e], pos[:, s:e], mask, cache=cache).hidden)
        assert cache.length == e
    return torch.cat(outs, dim=1)


@CONFIGS
@pytest.mark.parametrize("step", [1, 3], ids=["token", "chunk3"])
@torch.no_grad()
def test_kv_cache_matches_full_forward(config: ModelConfig, step: int) -> None:
    model = model_for(config)
    x, pos = inputs(2, 14)
    full = model(x, pos).hidden
    close(cached_steps(model, x, pos, prefill=5, step=step), full)


@CONFIGS
@torch.no_grad()
def test_kv_cache_without_masks(config: ModelConfig) -> None:
    model = model_for(config)
    x, pos = inputs(2, 10)
    full = model(x, pos).hidden
    cache = model.new_cache(2, 10)
    outs = [model(x[:, :4], pos[:, :4], cache=cache).hidden]
    for s in range(4, 10, 2):  # mask=None with a cache: causal, aligned with the end of the keys
        outs.append(model(x[:, s:s + 2], pos[:, s:s + 2], cache=cache).hidden)
    close(torch.cat(outs, dim=1), full)


@CONFIGS
@torch.no_grad()
def test_per_row_positions(config: ModelConfig) -> None:
    model = model_for(config)
    x, plain = inputs(2, 10)
    # row 0 shifted by 37; row 1 restarts its positions halfway (a second segment)
    pos = torch.stack([torch.arange(37, 47), torch.cat([torch.arange(5), torch.arange(5)])])
    both = model(x, pos).hidden
    close(both[0:1], model(x[0:1], pos[0:1]).hidden)
    close(both[1:2], model(x[1:2], pos[1:2]).hidden)
    # RoPE is relative: one offset for the whole row changes nothing, a restart does
    close(both[0:1], model(x[0:1], plain[0:1]).hidden, atol=1e-4)
    assert (both[1:2] - model(x[1:2], plain[1:2]).hidden).abs().amax() > 1e-4


# chunked local attention counts cache slots, so left padding moves a row's chunk boundaries: not padding-invariant
PADDED = [DENSE, preset("tiny", qk_norm=True, nope_every=2, rope_scaling=8.0, moe_experts=4, moe_every=1)]


@pytest.mark.parametrize("config", PADDED, ids=["dense", "features-no-chunks"])
@torch.no_grad()
def test_left_padded_row_matches_row_alone(config: ModelConfig) -> None:
    model = model_for(config)
    t, pad = 12, 4
    x, _ = inputs(2, t)
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :pad] = False
    pos = torch.stack([torch.arange(t), (torch.arange(t) - pad).clamp(min=0)])
    mask = prefix_bidirectional_mask(valid, torch.full((2,), t))
    batched = model(x, pos, mask, token_mask=valid).hidden
    alone = model(x[1:2, pad:], pos[1:2, pad:]).hidden
    close(batched[1:2, pad:], alone)
    close(batched[0:1], model(x[0:1], pos[0:1]).hidden)
    # and through the cache: a padded prefill, then decode steps with the padding still masked out
    stepped = cached_steps(model, x, pos, prefill=7, step=1, valid=valid)
    close(stepped[1:2, pad:], alone)
    close(stepped[0:1], batched[0:1])


@torch.no_grad()
def test_cache_overflow_raises() -> None:
    model = model_for(DENSE)
    x, pos = inputs(1, 10)
    cache = model.new_cache(1, 8)
    model(x[:, :6], pos[:, :6], cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(x[:, 6:9], pos[:, 6:9], cache=cache)
    assert cache.length == 6  # unchanged by the failed call
    with pytest.raises(ValueError, match="batch"):
        model(x[:, 6:7].expand(2, 1, 64), pos[:, 6:7].expand(2, 1), cache=cache)
    with pytest.raises(ValueError, match="mask"):
        model(x[:, 6:7], pos[:, 6:7], torch.ones(1, 1, 1, 6, dtype=torch.bool), cache=cache)
    cache.crop(7)  # beyond the end: nothing to forget (as the HF backbones' caches)
    assert cache.length == 6
    with pytest.raises(ValueError):
        cache.crop(-1)


@CONFIGS
@torch.no_grad()
def test_crop_then_refeed(config: ModelConfig) -> None:
    model = model_for(config)
    x, pos = inputs(2, 10)
    cache = model.new_cache(2, 10)
    model(x[:, :8], pos[:, :8], cache=cache)
    cache.crop(5)
    assert cache.length == 5
    x_new = x.clone()
    x_new[:, 5:] = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(9))
    tail = model(x_new[:, 5:], pos[:, 5:], cache=cache).hidden
    close(tail, model(x_new, pos).hidden[:, 5:])


@torch.no_grad()
def test_moe_aux_loss() -> None:
    x, pos = inputs(2, 12)
    assert model_for(DENSE)(x, pos).aux_loss.item() == 0.0
    moe = model_for(FEATURES)
    aux = moe(x, pos).aux_loss
    assert torch.isfinite(aux) and aux.item() > 0
    # weighted by router_aux_loss and summed over MoE layers; E * sum f P >= ~1 per layer for any router
    assert aux.item() == pytest.approx(FEATURES.router_aux_loss * FEATURES.n_layers, rel=0.5)
    unweighted = model_for(preset("tiny", moe_experts=4, router_aux_loss=1.0))(x, pos).aux_loss
    assert unweighted.item() > 0.9 * DENSE.n_layers
    # padding rows are left out of the statistics: masking row 1 gives row 0's loss alone
    no_pad = torch.ones(2, 12, dtype=torch.bool)
    close(moe(x, pos, token_mask=no_pad).aux_loss, aux)
    only_first = no_pad.clone()
    only_first[1] = False
    close(moe(x, pos, token_mask=only_first).aux_loss, moe(x[:1], pos[:1]).aux_loss)


@torch.no_grad()
def test_moe_gathered_equals_grouped() -> None:
    torch.manual_seed(0)
    moe = MoE(preset("tiny", moe_experts=4, moe_top_k=2))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    xf = torch.randn(6, 64)
    probs = moe.router(xf).softmax(-1)
    gates, experts = probs.topk(2, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    close(moe._gathered(xf, gates, experts), moe._grouped(xf, gates, experts))
    # the module picks by the number of token-expert pairs: 6 tokens x 2 > 4 experts is grouped,
    # one step of 2 rows (2 x 2 <= 4) is gathered; the two agree end to end
    x = torch.randn(2, 3, 64)
    out, _ = moe(x)
    steps = torch.cat([moe(x[:, i:i + 1])[0] for i in range(3)], dim=1)  # (2, 3, 64)
    close(steps, out)


def test_gradient_checkpointing_same_loss_and_grads() -> None:
    x, pos = inputs(2, 10)
    mask = prefix_bidirectional_mask(torch.ones(2, 10, dtype=torch.bool), torch.tensor([6, 10]))
    results = []
    for flag in (False, True):
        config = preset("tiny", gradient_checkpointing=flag, moe_experts=4, attention_chunk=4, nope_every=2)
        model = model_for(config).train()
        out = model(x, pos, mask)
        loss = out.hidden.pow(2).mean() + out.aux_loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        close(grads_a[name], grads_b[name], atol=1e-6)


@CONFIGS
@torch.no_grad()
def test_backends_agree(config: ModelConfig) -> None:
    x, pos = inputs(2, 12)
    mask = prefix_bidirectional_mask(torch.tensor([[True] * 12, [False] * 3 + [True] * 9]), torch.tensor([7, 12]))
    outs = {}
    for backend in ("math", "sdpa", "auto"):
        model = model_for(ModelConfig(**{**config.to_dict(), "attention": backend, "capabilities": ("ar",)}))
        outs[backend] = (model(x, pos).hidden, model(x, pos, mask).hidden)
    for backend in ("sdpa", "auto"):
        close(outs[backend][0], outs["math"][0])
        close(outs[backend][1], outs["math"][1])


def test_rope_scaling_frequencies() -> None:
    plain = rope_frequencies(preset("tiny"))
    scaled = rope_frequencies(preset("tiny", rope_scaling=8.0, rope_original_positions=8192))
    wavelen = 2 * torch.pi / plain
    high = wavelen < 8192 / 4.0  # short wavelengths: untouched
    low = wavelen > 8192 / 1.0  # long wavelengths: slowed down by the factor
    assert high.any() and low.any()
    close(scaled[high], plain[high])
    close(scaled[low], plain[low] / 8.0)
    mid = ~high & ~low
    assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8.0)).all()


def test_half_precision_keeps_rope_tables_float32() -> None:
    model = model_for(FEATURES)
    x, pos = inputs(1, 6)
    ref = model(x, pos).hidden
    model = model.to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32 and model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(x.bfloat16(), pos).hidden
    assert out.dtype == torch.bfloat16
    close(out.float(), ref.detach(), atol=0.15)


def test_meta_build_then_to_empty_gets_real_rope_tables() -> None:
    with torch.device("meta"):
        model = Transformer(DENSE)
    assert model.rope.cos.is_meta
    model.to_empty(device="cpu")
    reference = Transformer(DENSE)
    close(model.rope.cos, reference.rope.cos, atol=0.0)
    close(model.rope.sin, reference.rope.sin, atol=0.0)


@CONFIGS
@torch.no_grad()
def test_fused_projections_give_the_same_outputs_and_a_decoding_layout(config: ModelConfig) -> None:
    model = model_for(config)
    x, pos = inputs(2, 7)
    expected = model(x, pos).hidden
    fused = model.fuse_projections()
    dense_ffns = sum(not layer.is_moe for layer in model.layers)
    assert fused == 2 * config.n_layers + dense_ffns and model.fuse_projections() == 0  # once only
    names = set(model.state_dict())
    assert "layers.0.attention.wqkv.weight" in names and "layers.0.attention.wq.weight" not in names
    close(model(x, pos).hidden, expected)
    cache = model.new_cache(2, 12)  # and decoding against a cache
    model(x[:, :5], pos[:, :5], cache=cache)
    close(model(x[:, 5:], pos[:, 5:], cache=cache).hidden, expected[:, 5:])


def test_rope_rotates_pairs_half_a_head_apart() -> None:
    from valle_cli.model.transformer import RotaryEmbedding, apply_rope

    rope = RotaryEmbedding(DENSE)
    x = torch.randn(1, 2, 3, DENSE.head_dim)
    pos = torch.tensor([[0, 5, 40]])
    cos, sin = rope(pos)
    half = DENSE.head_dim // 2
    angles = pos[0, :, None].double() * rope_frequencies(DENSE)[None]  # (T, Dh/2)
    c, s = angles.cos().float(), angles.sin().float()
    x1, x2 = x[..., :half], x[..., half:]
    close(apply_rope(x, cos, sin), torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1))
    close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # a rotation: norms kept


@CONFIGS
@torch.no_grad()
def test_fixed_shape_decode_steps_match_the_full_forward(config: ModelConfig) -> None:
    """Transformer.decode: keys written at tensor slots, every query over the whole (larger) cache under a mask."""
    model = model_for(config)
    x, pos = inputs(2, 12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # a left-padded row: its padding stays masked out
    full = model(x, pos, prefix_bidirectional_mask(valid, torch.full((2,), 12)), token_mask=valid).hidden
    max_len = 20  # more slots than the sequence: the empty ones are masked, never read
    cache = model.new_cache(2, max_len)
    outs = [model(x[:, :5], pos[:, :5], prefix_bidirectional_mask(valid[:, :5], torch.full((2,), 5)),
                  cache=cache).hidden]
    filled = torch.zeros(2, max_len, dtype=torch.bool)
    filled[:, :5] = valid[:, :5]
    for s in range(5, 12):
        filled[:, s] = True
        slots = torch.tensor([s])
        outs.append(model.decode(x[:, s:s + 1], pos[:, s:s + 1], slots, filled[:, None, None, :], cache))
    got = torch.cat(outs, dim=1)
    close(got[0], full[0])
    close(got[1, 3:], full[1, 3:])
    assert cache.length == 5  # decode leaves the count to its caller
    with pytest.raises(ValueError, match="do not fit"):
        model.decode(x[:, :1], pos[:, :1], torch.tensor([12]), filled[:, None, None, :12], cache)


def _flex_parity(config: ModelConfig, device: str, grad: bool) -> None:
    import dataclasses
    import warnings

    torch.manual_seed(0)
    dense = Transformer(config).to(device)
    flex = Transformer(dataclasses.replace(config, attention="flex")).to(device)
    flex.load_state_dict(dense.state_dict())
    x, pos = inputs(2, 20)
    x, pos = x.to(device), pos.to(device)
    valid = torch.ones(2, 20, dtype=torch.bool, device=device)
    valid[1, 15:] = False
    mask = prefix_bidirectional_mask(valid, torch.tensor([20, 9], device=device))  # row 1 bidirectional from 9
    outs = []
    for model in (dense, flex):
        xi = x.clone().requires_grad_(grad)
        with warnings.catch_warnings(), torch.set_grad_enabled(grad):
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is the unfused reference
            hidden = model(xi, pos, mask, token_mask=valid).hidden[valid]  # (N, D) the real positions
        if grad:
            (hidden ** 2).mean().backward()
            outs.append((hidden, xi.grad[valid], model.layers[0].attention.wq.weight.grad))
        else:
            outs.append((hidden,))
    for a, b in zip(*outs, strict=True):
        close(a, b, atol=1e-5)


@pytest.mark.parametrize("config", PADDED, ids=["dense", "features-no-chunks"])
def test_flex_attention_block_masks_give_the_dense_masks_outputs(config: ModelConfig, monkeypatch) -> None:
    """attention=flex: the training mask (padding, causal prefix, bidirectional response) as a block mask;
    forward only on the CPU (FlexAttention has no backward there)."""
    from valle_cli.model import transformer

    built = []
    monkeypatch.setattr(transformer, "block_mask_of", lambda m: built.append(m) or block_mask_of(m))
    _flex_parity(config, "cpu", grad=False)
    assert len(built) == 1  # one block mask per forward, shared by the layers


@pytest.mark.gpu
@pytest.mark.parametrize("config", PADDED, ids=["dense", "features-no-chunks"])
def test_flex_attention_outputs_and_gradients_on_cuda(config: ModelConfig) -> None:
    _flex_parity(config, "cuda", grad=True)
