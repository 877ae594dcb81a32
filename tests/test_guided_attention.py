"""Guided attention (model/guided_attention.py): the penalty, the probed heads, and that it trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_model import batch_of, config, example
from valle_cli.data import tasks
from valle_cli.errors import InputError
from valle_cli.model.attention import attention_probs
from valle_cli.model.guided_attention import guide_weights, guided_attention_loss
from valle_cli.model.masks import prefix_bidirectional_mask
from valle_cli.model.valle import CodecLM, GuideConfig
from valle_cli.training.config import TrainConfig

T_, R_, P_, L_, K_ = tasks.TEXT, tasks.RESPONSE, tasks.PROMPT, tasks.LANG, tasks.TASK


def test_weights_are_zero_on_the_diagonal_and_one_off_the_text():
    # text of 4, lang, task, prompt of 2, response of 4, padding of 1
    seg = torch.tensor([[T_] * 4 + [L_, K_] + [P_] * 2 + [R_] * 4 + [tasks.PAD]])
    w, queries = guide_weights(seg, width=0.2)
    assert w.shape == (1, 13, 13)
    assert queries[0].tolist() == [False] * 8 + [True] * 4 + [False]
    resp, text = range(8, 12), range(4)
    for t, n in zip(resp, text, strict=True):  # frame t of 4 and token n of 4 are on the diagonal
        assert float(w[0, t, n]) == pytest.approx(0.0, abs=1e-6)
    assert float(w[0, 8, 3]) == pytest.approx(1 - math.exp(-0.75**2 / 0.08))  # far corner
    assert float(w[0, 8, 1]) < float(w[0, 8, 2]) < float(w[0, 8, 3])  # grows away from the diagonal
    assert (w[0, 8:12, 4:] == 1).all()  # lang, task, prompt, response, padding: not text


def test_rows_without_text_have_no_counted_queries():
    seg = torch.tensor([[L_, K_, P_, R_, R_], [T_, L_, K_, R_, R_]])
    _, queries = guide_weights(seg, 0.2)
    assert queries.tolist() == [[False] * 5, [False, False, False, True, True]]


def test_the_loss_prefers_diagonal_attention():
    seg = torch.tensor([[T_] * 4 + [L_, K_] + [R_] * 4])
    eye = torch.zeros(1, 1, 10, 10)
    for t in range(4):
        eye[0, 0, 6 + t, t] = 1.0  # frame t reads token t
    anti = torch.zeros(1, 1, 10, 10)
    for t in range(4):
        anti[0, 0, 6 + t, 3 - t] = 1.0
    elsewhere = torch.zeros(1, 1, 10, 10)
    elsewhere[0, 0, 6:, 5] = 1.0  # every frame reads the task token
    scores = [float(s) / n for s, n in (guided_attention_loss(p, seg, 0.2) for p in (eye, anti, elsewhere))]
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and 0.5 < scores[1] < 1.0 and scores[2] == pytest.approx(1.0)
    assert guided_attention_loss(eye, seg, 0.2)[1] == 4


def guided_model(weight: float = 1.0, heads: int = 1, seed: int = 0, **kw) -> CodecLM:
    torch.manual_seed(seed)
    return CodecLM(config(**kw), guide=GuideConfig(weight=weight, heads=heads))


def test_probed_heads_are_the_attention_the_layer_uses():
    model = guided_model(heads=2).eval()
    b = batch_of(example("ar"), example("nar", level=1, seed=1))
    layer = model.guided
    seen = {}
    layer.register_forward_hook(lambda _m, args, _out: seen.update(x=args[0], cos=args[1], sin=args[2], mask=args[3]))
    with torch.no_grad():
        model(b)
    assert layer.probed is None  # read and cleared by the loss
    with torch.no_grad():
        model.backbone(model.embed(b), b.positions, prefix_bidirectional_mask(b.segment != 0, b.bidir_start))
    from valle_cli.model.transformer import apply_rope
    n, h_kv, dh = layer.n_heads, layer.n_kv_heads, layer.head_dim
    x = seen["x"]
    q = layer.wq(x).view(*x.shape[:2], n, dh).transpose(1, 2)
    k = layer.wk(x).view(*x.shape[:2], h_kv, dh).transpose(1, 2)
    q, k = apply_rope(q, seen["cos"], seen["sin"]), apply_rope(k, seen["cos"], seen["sin"])
    expected = attention_probs(q, k, seen["mask"])[:, :2]  # (B, 2, S, S)
    assert torch.allclose(layer.probed, expected, atol=1e-6)


def test_the_loss_is_added_and_the_forward_is_unchanged():
    b = batch_of(example("ar", text=6, frames=9), example("nar", level=1, seed=1), example("mask", seed=2))
    plain, guided = guided_model(weight=0.0), guided_model(weight=0.5)
    guided.load_state_dict(plain.state_dict())
    out_plain, out_guided = plain.train()(b), guided.train()(b)
    assert "align" not in out_plain.stats
    align_sum, n, _ = out_guided.stats["align"]
    assert n == 10 + 7 + 7  # AR response positions (frames + start) and the two other rows' frames
    assert 0 < float(align_sum) / n <= 1
    expected = float(out_plain.loss.detach()) + 0.5 * float(align_sum) / n
    assert float(out_guided.loss.detach()) == pytest.approx(expected, rel=1e-5)
    for name in ("ar", "nar1", "mask"):
        assert float(out_guided.stats[name][0]) == pytest.approx(float(out_plain.stats[name][0]), rel=1e-5)


def test_decoding_with_a_cache_probes_nothing():
    model = guided_model().eval()
    cache = model.backbone.new_cache(1, 16)
    with torch.no_grad():
        model.backbone(torch.randn(1, 5, model.config.dim), torch.arange(5)[None], cache=cache)
    assert model.guided.probed is None


def test_a_few_steps_pull_the_guided_head_onto_the_diagonal():
    model = guided_model(weight=1.0, seed=3).train()
    b = batch_of(*(example("ar", text=8, frames=16, seed=s) for s in range(4)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(b)
        s, n, _ = out.stats["align"]
        first = float(s) / n if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    s, n, _ = model(b).stats["align"]
    assert float(s) / n < 0.5 * first


def test_guide_settings_are_checked():
    with pytest.raises(InputError, match="native backbone"):
        CodecLM(config(arch="llama"), guide=GuideConfig(weight=1.0))
    with pytest.raises(InputError, match="do not fit"):
        CodecLM(config(), guide=GuideConfig(weight=1.0, layer=7))
    with pytest.raises(InputError, match="align_width"):
        TrainConfig(align_width=0.0)
    assert CodecLM(config(), guide=GuideConfig(weight=0.0, layer=7)).guided is None  # off: not checked
    assert "guided" not in "".join(guided_model().state_dict())  # no second name for the guided layer
    np.testing.assert_equal(GuideConfig().weight, 0.0)
