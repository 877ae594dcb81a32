"""The transformers backbones (llama, mixtral) behind our interface: masks, caches, router loss, backends."""

from __future__ import annotations

import pytest
import torch

from valle_cli.errors import ValleError
from valle_cli.model import build_backbone
from valle_cli.model.config import preset
from valle_cli.model.hf_backbones import HFBackbone, hf_attention_mask
from valle_cli.model.masks import decode_step_mask, prefix_bidirectional_mask

ARCHES = {"llama": {}, "mixtral": {"moe_experts": 4, "moe_top_k": 2}}
ATOL = 1e-4


def build(arch: str, seed: int = 0, **overrides) -> HFBackbone:
    torch.manual_seed(seed)
    return HFBackbone(preset("tiny", arch=arch, **ARCHES[arch], **overrides)).eval()


def inputs(b: int = 2, t: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, 64) and positions that restart at 0 mid-sequence, as ours do per segment."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, 64, generator=g)
    half = t // 2
    positions = torch.cat([torch.arange(half), torch.arange(t - half)]).expand(b, t)  # (B, T)
    return x, positions


def full_mask(b: int, t: int, bidir_start: int) -> torch.Tensor:
    return prefix_bidirectional_mask(torch.ones(b, t, dtype=torch.bool), torch.full((b,), bidir_start))


@pytest.fixture(params=list(ARCHES))
def arch(request) -> str:
    return request.param


@torch.no_grad()
def test_shapes_and_build_backbone(arch):
    bb = build_backbone(preset("tiny", arch=arch, **ARCHES[arch])).eval()
    assert isinstance(bb, HFBackbone)
    x, pos = inputs(2, 8)
    out = bb(x, pos, full_mask(2, 8, 5))
    assert out.hidden.shape == (2, 8, 64)
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0  # eval: no router loss


@torch.no_grad()
def test_causal_with_mask_none_and_causal_prefix_mask(arch):
    bb = build(arch)
    x, pos = inputs(2, 8)
    none = bb(x, pos).hidden
    causal = bb(x, pos, full_mask(2, 8, bidir_start=8)).hidden
    # mask None must be the plain causal mask, even though positions restart (not "packed sequences")
    torch.testing.assert_close(none, causal, atol=ATOL, rtol=0)
    x2 = x.clone()
    x2[:, 5] += 1.0
    for mask in (None, full_mask(2, 8, 8)):
        changed = bb(x2, pos, mask).hidden
        torch.testing.assert_close(changed[:, :5], causal[:, :5], atol=ATOL, rtol=0)  # the past never sees the future
        assert (changed[:, 5:] - causal[:, 5:]).abs().amax() > 1e-3


@torch.no_grad()
def test_bidirectional_response_sees_the_future(arch):
    bb = build(arch)
    x, pos = inputs(2, 8)
    mask = full_mask(2, 8, bidir_start=5)  # prefix 0..4 causal, response 5..7 bidirectional
    base = bb(x, pos, mask).hidden
    x2 = x.clone()
    x2[:, 7] += 1.0  # the last response token
    changed = bb(x2, pos, mask).hidden
    torch.testing.assert_close(changed[:, :5], base[:, :5], atol=ATOL, rtol=0)  # the causal prefix is untouched
    assert (changed[:, 5:7] - base[:, 5:7]).abs().amax(dim=-1).min() > 1e-4  # earlier response positions see it


@torch.no_grad()
@pytest.mark.parametrize("prefill_mask", [False, True])
def test_kv_cache_matches_full_forward(arch, prefill_mask):
    bb = build(arch)
    b, t, p = 2, 9, 4
    x, pos = inputs(b, t)
    valid = torch.ones(b, t, dtype=torch.bool)
    full = bb(x, pos).hidden  # (B, T, D) causal

    cache = bb.new_cache(b, t, x.device, x.dtype)
    prefill = bb(x[:, :p], pos[:, :p], full_mask(b, p, p) if prefill_mask else None, cache=cache).hidden
    assert cache.length == p
    torch.testing.assert_close(prefill, full[:, :p], atol=ATOL, rtol=0)
    for i in range(p, t - 2):  # one token at a time
        step = bb(x[:, i:i + 1], pos[:, i:i + 1], decode_step_mask(valid[:, :i + 1], 1), cache=cache).hidden
        assert cache.length == i + 1
        torch.testing.assert_close(step[:, 0], full[:, i], atol=ATOL, rtol=0)
    # the last two tokens as one chunk, with mask None (causal, bottom-right aligned)
    chunk = bb(x[:, t - 2:], pos[:, t - 2:], None, cache=cache).hidden
    torch.testing.assert_close(chunk, full[:, t - 2:], atol=ATOL, rtol=0)
    assert cache.length == t
    with pytest.raises(ValleError, match="overflow"):
        bb(x[:, :1], pos[:, :1], None, cache=cache)


@torch.no_grad()
def test_crop_then_refeed_reproduces(arch):
    bb = build(arch)
    b, t = 2, 8
    x, pos = inputs(b, t)
    valid = torch.ones(b, t, dtype=torch.bool)
    cache = bb.new_cache(b, t, x.device, x.dtype)
    first = bb(x[:, :6], pos[:, :6], cache=cache).hidden
    cache.crop(10)  # beyond the end: nothing to forget
    assert cache.length == 6
    cache.crop(4)
    assert cache.length == 4 and cache.inner.get_seq_length() == 4
    again = bb(x[:, 4:6], pos[:, 4:6], decode_step_mask(valid[:, :6], 2), cache=cache).hidden
    torch.testing.assert_close(again, first[:, 4:6], atol=ATOL, rtol=0)
    assert cache.length == 6


@torch.no_grad()
@pytest.mark.parametrize("bidir", [False, True])
def test_left_padding_leaves_valid_rows_unchanged(arch, bidir):
    bb = build(arch)
    t, n, pad = 8, 5, 3  # row 0: 3 padding tokens then 5 real ones; row 1: 8 real ones
    x, _ = inputs(2, t)
    alone_x = x[:1, pad:]  # (1, 5, D)
    alone_pos = torch.arange(n)[None]
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[0, :pad] = False
    pos = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(n)]), torch.arange(t)])
    start = 2 if bidir else n  # in the real tokens' own frame
    mask = prefix_bidirectional_mask(valid, torch.tensor([pad + start, t]))
    padded = bb(x, pos, mask).hidden[0, pad:]
    alone = bb(alone_x, alone_pos, full_mask(1, n, start)).hidden[0]
    torch.testing.assert_close(padded, alone, atol=ATOL, rtol=0)


def test_router_aux_loss(arch):
    bb = build(arch).train()
    x, pos = inputs(2, 8)
    out = bb(x, pos, full_mask(2, 8, 5))
    if arch == "llama":
        assert out.aux_loss.item() == 0.0
        return
    assert torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0 and out.aux_loss.requires_grad
    # an all-valid token_mask is the same as none; marking half the tokens as padding changes the loss
    all_valid = bb(x, pos, full_mask(2, 8, 5), token_mask=torch.ones(2, 8, dtype=torch.bool)).aux_loss
    torch.testing.assert_close(all_valid, out.aux_loss)
    half = torch.ones(2, 8, dtype=torch.bool)
    half[:, :4] = False
    assert bb(x, pos, full_mask(2, 8, 5), token_mask=half).aux_loss.item() != pytest.approx(out.aux_loss.item())
    scaled = build(arch, router_aux_loss=0.02).train()(x, pos, full_mask(2, 8, 5)).aux_loss
    torch.testing.assert_close(scaled, 2 * out.aux_loss)


@torch.no_grad()
def test_math_and_sdpa_agree(arch):
    sdpa = build(arch, attention="sdpa")
    math = build(arch, attention="math")
    assert (sdpa.implementation, math.implementation) == ("sdpa", "eager")
    math.load_state_dict(sdpa.state_dict())
    x, pos = inputs(2, 8)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :2] = False
    for mask in (None, prefix_bidirectional_mask(valid, torch.tensor([5, 8]))):
        torch.testing.assert_close(math(x, pos, mask).hidden, sdpa(x, pos, mask).hidden, atol=1e-5, rtol=0)
    # and a cached step on each
    caches = [bb.new_cache(2, 8) for bb in (sdpa, math)]
    outs = []
    for bb, cache in zip((sdpa, math), caches, strict=True):
        bb(x[:, :7], pos[:, :7], cache=cache)
        outs.append(bb(x[:, 7:], pos[:, 7:], decode_step_mask(valid, 1), cache=cache).hidden)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_explicit_flash_on_cpu_raises():
    with pytest.raises(ValleError):
        build("llama", attention="flash")
    assert build("llama", attention="auto").implementation == "sdpa"


def test_unsupported_features_raise():
    with pytest.raises(ValleError, match="qk_norm"):
        HFBackbone(preset("tiny", arch="llama", qk_norm=True))


def test_gradient_checkpointing_same_gradients(arch):
    plain = build(arch).train()
    ckpt = build(arch, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, pos = inputs(2, 8)
    mask = full_mask(2, 8, 5)
    grads = []
    for bb in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        out = bb(xi, pos, mask)
        (out.hidden.square().mean() + out.aux_loss).backward()
        grads.append([xi.grad] + [p.grad for p in bb.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 1
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_mask_translation_parity():
    """Our bool mask through each HF attention function equals a hand-written masked softmax."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    b, h, q, s, dh = 2, 4, 5, 7, 8
    query, key, value = torch.randn(b, h, q, dh), torch.randn(b, h, s, dh), torch.randn(b, h, s, dh)
    valid = torch.rand(b, s) > 0.3
    mask = decode_step_mask(valid, q)  # (B, 1, Q, S) bool, the diagonal always allowed
    mask[0, 0, 1, 0] = True  # and a non-causal entry, to show the mask is not replaced by a causal one

    eager = hf_attention_mask(mask, "eager", torch.float32)
    assert eager.dtype == torch.float32 and eager.shape == mask.shape
    assert (eager[mask] == 0).all() and (eager[~mask] == torch.finfo(torch.float32).min).all()
    assert hf_attention_mask(mask, "sdpa", torch.float32) is mask

    scores = (query @ key.transpose(-1, -2)) / dh**0.5
    reference = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value  # (B, H, Q, Dh)
    reference = reference.transpose(1, 2)  # HF returns (B, Q, H, Dh)

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    module.eval()
    out_eager, _ = eager_attention_forward(module, query, key, value, eager, scaling=dh**-0.5)
    out_sdpa, _ = sdpa_attention_forward(module, query, key, value, hf_attention_mask(mask, "sdpa", query.dtype),
                                         scaling=dh**-0.5)
    torch.testing.assert_close(out_eager, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_sdpa, reference, atol=1e-5, rtol=0)


def test_per_call_backend_switch_survives_checkpointing(monkeypatch):
    """flash falls back to sdpa per call; the checkpoint recompute must replay the same backend.

    Simulated on CPU: an sdpa-built model whose calls run on eager. Without the checkpoint context the
    recompute would run sdpa and torch.utils.checkpoint would reject the mismatching saved tensors.
    """
    eager = build("llama", attention="math").train()
    switched = build("llama", attention="sdpa", gradient_checkpointing=True).train()
    switched.load_state_dict(eager.state_dict())
    monkeypatch.setattr(switched, "_implementation_for", lambda mask, positions: "eager")
    x, pos = inputs(2, 8)
    mask = full_mask(2, 8, 5)
    grads = []
    for bb in (eager, switched):
        xi = x.clone().requires_grad_(True)
        bb(xi, pos, mask).hidden.square().mean().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert switched.model.config._attn_implementation == "sdpa"  # restored after the call
