"""The unified codec LM: sequence layout, embeddings, heads, masks, losses; every backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from valle_cli.data import tasks
from valle_cli.model.config import ModelConfig, preset
from valle_cli.model.masks import decode_step_mask, prefix_bidirectional_mask
from valle_cli.model.valle import Batch, CodecLM, flops_per_token, len_digits

K, V, VOCAB = 3, 32, 40
ARCHES = {
    "transformer": dict(arch="transformer"),
    "transformer-moe": dict(arch="transformer", moe_experts=4, qk_norm=True, nope_every=2),
    "llama": dict(arch="llama"),
    "mixtral": dict(arch="mixtral", moe_experts=4),
}


def config(**kw) -> ModelConfig:
    return preset("tiny", n_codebooks=K, codebook_size=V, text_vocab_size=VOCAB, **kw)


def example(kind: str, level: int = 0, frames: int = 7, text: int = 5, prompt: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, V, size=(K, frames))
    mask = None
    if kind == "mask":
        mask = np.zeros(frames, bool)
        mask[rng.choice(frames, size=frames // 2 + 1, replace=False)] = True
    return tasks.Example(text=rng.integers(4, VOCAB, size=text), prompt=rng.integers(0, V, size=(K, prompt)),
                         codes=codes, kind=kind, level=level, mask=mask)


def batch_of(*examples, unified: bool = False) -> Batch:
    return Batch.from_numpy(tasks.collate(list(examples), V, unified_positions=unified))


def model_for(name: str, seed: int = 0) -> CodecLM:
    torch.manual_seed(seed)
    return CodecLM(config(**ARCHES[name])).eval()


# ----------------------------------------------------------------------------- layout (numpy)


def test_collate_layout_per_task():
    ar, nar, mask = example("ar"), example("nar", level=2, frames=5), example("mask", frames=6)
    b = tasks.collate([ar, nar, mask], V)
    seg = b.segment
    assert b.shape == (3, 5 + 2 + 4 + 7 + 1)
    assert (seg[0] == [1] * 5 + [2, 3] + [4] * 4 + [5] * 8).all()
    # AR: start id then level-0 codes as inputs, codes then stop as targets
    r0 = 11
    assert b.response[0, 0, r0] == V and (b.response[0, 0, r0 + 1:r0 + 8] == ar.codes[0]).all()
    assert (b.targets[0, r0:r0 + 7] == ar.codes[0]).all() and b.targets[0, r0 + 7] == V
    assert (b.targets[0, :r0] == tasks.IGNORE).all() and b.bidir_start[0] == b.shape[1]
    # NAR level 2: levels 0, 1 in, level 2 out, bidirectional from the response on
    assert (b.response[1, :2, r0:r0 + 5] == nar.codes[:2]).all() and (b.response[1, 2] == 0).all()
    assert (b.targets[1, r0:r0 + 5] == nar.codes[2]).all() and b.bidir_start[1] == r0 and b.task[1] == 2
    # NAR-len: masked frames carry the mask id and are the only targets; len read before the response
    m = mask.mask
    assert (b.response[2, 0, r0:r0 + 6][m] == V).all() and (b.response[2, 0, r0:r0 + 6][~m] == mask.codes[0][~m]).all()
    assert ((b.targets[2, r0:r0 + 6] != tasks.IGNORE) == m).all() and b.task[2] == K
    assert b.len_position[2] == r0 - 1 and b.len_target[2] == 6 and b.len_position[0] == -1
    # per-segment positions restart at 0; unified ones count up
    assert list(b.positions[0, :7]) == [0, 1, 2, 3, 4, 0, 0] and b.positions[0, r0] == 0
    assert list(tasks.collate([ar], V, unified_positions=True).positions[0, :8]) == list(range(8))


def test_task_after_prompt_layout_shares_the_prefix_of_every_task():
    ar, nar, mask = example("ar"), example("nar", level=2, frames=5), example("mask", frames=6)
    b = tasks.collate([ar, nar, mask], V, task_after_prompt=True)
    assert (b.segment[0] == [1] * 5 + [2] + [4] * 4 + [3] + [5] * 8).all()
    prefix = slice(0, 10)  # text, lang, prompt: the same inputs whatever the task
    assert (b.prompt[0, :, 6:10] == ar.prompt).all() and (b.text[0, :5] == ar.text).all()
    assert all((b.segment[i, prefix] == b.segment[0, prefix]).all() for i in (1, 2))
    r0 = 11
    assert b.bidir_start[1] == r0 and (b.targets[1, r0:r0 + 5] == nar.codes[2]).all()
    assert b.len_position[2] == r0 - 1 and b.segment[2, r0 - 1] == tasks.TASK  # len read at the task token
    assert list(b.positions[0, :12]) == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 0, 0]
    # a checkpoint's config from before the field: the task-first layout it was trained with
    old = {k: v for k, v in config().to_dict().items() if k != "task_after_prompt"}
    assert not ModelConfig.from_saved(old).task_after_prompt and ModelConfig.from_dict(old).task_after_prompt


def test_draw_examples_levels_tasks_and_dropout():
    rng = np.random.default_rng(0)
    records = [(np.arange(5), np.zeros((K, 30), np.int64)) for _ in range(2000)]
    prompts = [np.ones((K, 200), np.int64)] * 2000
    cfg = tasks.TaskConfig(masked_p=0.5, cond_dropout_p=0.1, prompt_dropout_p=0.1, prompt_seconds=(1.0, 2.0))
    ex = tasks.draw_examples(records, prompts, rng, cfg, frame_rate=25.0)
    levels = np.bincount([e.level for e in ex], minlength=K) / len(ex)
    assert np.allclose(levels, np.array([3, 2, 1]) / 6, atol=0.04)  # auto: linear decreasing
    level0 = [e for e in ex if e.level == 0]
    assert abs(np.mean([e.kind == "mask" for e in level0]) - 0.5) < 0.06
    assert all(e.kind == "nar" for e in ex if e.level)
    no_text = np.mean([len(e.text) == 0 for e in ex])
    no_prompt = np.mean([e.prompt.shape[1] == 0 for e in ex])
    assert abs(no_text - 0.1) < 0.03 and abs(no_prompt - 0.2) < 0.03  # text dropped only with the prompt
    assert all(25 <= e.prompt.shape[1] <= 50 for e in ex if e.prompt.shape[1])
    masked = [e.mask.mean() for e in ex if e.kind == "mask"]
    assert abs(np.mean(masked) - 0.8) < 0.02


def test_level_choices_follow_capabilities():
    assert np.allclose(tasks.level_probabilities("equal", 4, ("ar", "nar", "len")), 0.25)
    assert np.allclose(tasks.level_probabilities("auto", 4, ("ar",)), [1, 0, 0, 0])
    assert tasks.level_probabilities((0.0, 1.0, 1.0), 3, ("nar",))[0] == 0
    with pytest.raises(Exception, match="probabilities"):
        tasks.level_probabilities((1.0, 2.0), 3, ("ar", "nar"))
    rng = np.random.default_rng(0)
    records = [(np.arange(3), np.zeros((K, 10), np.int64))] * 50
    ex = tasks.draw_examples(records, [None] * 50, rng, tasks.TaskConfig(levels=(1.0, 0.0, 0.0)), 25.0, ("nar", "len"))
    assert {e.kind for e in ex} == {"mask"}  # level 0 without the AR capability is trained masked
    assert len_digits(torch.tensor([0, 7, 123, 10**6]), 5).tolist() == [
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 7], [0, 0, 1, 2, 3], [9, 9, 9, 9, 9]]


# ----------------------------------------------------------------------------- the model, every backbone


@pytest.mark.parametrize("name", ARCHES)
def test_loss_stats_and_backward(name):
    model = model_for(name).train()
    b = batch_of(example("ar"), example("nar", level=1, seed=1), example("nar", level=2, seed=2),
                 example("mask", seed=3))
    out = model(b)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.stats) == {"ar", "nar1", "nar2", "mask", "len"}
    assert out.stats["ar"][1] == 8 and out.stats["nar1"][1] == 7 and out.stats["len"][1] == 1
    # at init every code is about equally likely: the loss is near log(V)
    assert abs(float(out.stats["nar1"][0]) / 7 - np.log(V)) < 0.5
    out.loss.backward()
    assert model.head_ar.weight.grad is not None and model.head_nar[1].weight.grad is not None
    assert model.head_len.weight.grad is not None and model.resp_mask.weight.grad is not None
    if "moe" in name or name == "mixtral":
        assert float(out.aux_loss.detach()) > 0


@pytest.mark.parametrize("name", ARCHES)
def test_ar_causality_no_future_code_changes_an_earlier_logit(name):
    model = model_for(name)
    a = example("ar", frames=9)
    changed = example("ar", frames=9)
    changed.codes = a.codes.copy()
    changed.codes[0, 6] = (a.codes[0, 6] + 1) % V  # response input position r0 + 7
    with torch.no_grad():
        h1, _ = model.hidden_states(batch_of(a))
        h2, _ = model.hidden_states(batch_of(changed))
    r0 = 5 + 2 + 4
    first_changed = r0 + 7
    assert torch.allclose(h1[:, :first_changed], h2[:, :first_changed], atol=1e-5)
    assert not torch.allclose(h1[:, first_changed:], h2[:, first_changed:], atol=1e-5)


@pytest.mark.parametrize("name", ARCHES)
def test_nar_response_is_bidirectional_and_prefix_stays_causal(name):
    model = model_for(name)
    a = example("nar", level=1, frames=9)
    changed = example("nar", level=1, frames=9)
    changed.codes = a.codes.copy()
    changed.codes[0, 8] = (a.codes[0, 8] + 1) % V  # the last response frame's input
    with torch.no_grad():
        h1, _ = model.hidden_states(batch_of(a))
        h2, _ = model.hidden_states(batch_of(changed))
    r0 = 5 + 2 + 4
    assert torch.allclose(h1[:, :r0], h2[:, :r0], atol=1e-5)  # the prefix never sees the response
    assert not torch.allclose(h1[:, r0], h2[:, r0], atol=1e-4)  # the first frame sees the last


@pytest.mark.parametrize("name", ARCHES)
def test_batch_rows_equal_single_rows(name):
    model = model_for(name)
    rows = [example("ar", frames=9), example("nar", level=2, frames=4, text=3, seed=5),
            example("mask", frames=6, prompt=0, seed=6)]
    with torch.no_grad():
        together, _ = model.hidden_states(batch_of(*rows))
        for i, row in enumerate(rows):
            alone, _ = model.hidden_states(batch_of(row))
            n = alone.shape[1]
            assert torch.allclose(together[i, :n], alone[0], atol=1e-4), i


@pytest.mark.parametrize("name", ARCHES)
@pytest.mark.parametrize("unified", [False, True])
def test_kv_cache_decoding_equals_the_full_forward(name, unified):
    """Prefill up to the AR start position, then one code per step: every hidden state as in one pass."""
    model = model_for(name)
    b = batch_of(example("ar", frames=10), example("ar", frames=10, seed=1), unified=unified)
    with torch.no_grad():
        x = model.embed(b)  # (B, S, D)
        valid = b.segment != tasks.PAD
        full = model.backbone(x, b.positions, prefix_bidirectional_mask(valid, b.bidir_start)).hidden
        s = x.shape[1]
        n = 5 + 2 + 4 + 1  # text, lang, task, prompt, start
        cache = model.backbone.new_cache(2, s, "cpu", torch.float32)
        pre = model.backbone(x[:, :n], b.positions[:, :n], prefix_bidirectional_mask(valid[:, :n], b.bidir_start),
                             cache=cache).hidden
        steps = [pre]
        for t in range(n, s):
            step_mask = decode_step_mask(valid[:, :t + 1], 1)
            steps.append(model.backbone(x[:, t:t + 1], b.positions[:, t:t + 1], step_mask, cache=cache).hidden)
        assert cache.length == s
        cached = torch.cat(steps, dim=1)
        assert torch.allclose(model.head_ar(cached), model.head_ar(full), atol=1e-4)


def test_the_three_backbones_train_on_the_same_batch():
    b = batch_of(example("ar"), example("nar", level=1, seed=1), example("mask", seed=2))
    for name in ("transformer", "llama", "mixtral"):
        model = model_for(name).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        first = None
        for _ in range(15):
            loss = model(b).loss
            first = first if first is not None else float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(model(b).loss.detach()) < 0.7 * first, name


def test_len_head_predicts_digits():
    model = model_for("transformer")
    h = torch.zeros(2, model.config.dim)
    with torch.no_grad():
        model.head_len.bias.copy_(torch.full((50,), -5.0))
        for digit_pos, digit in enumerate([0, 0, 1, 2, 3]):  # 123 frames
            model.head_len.bias[digit_pos * 10 + digit] = 5.0
    assert model.predict_len(h).tolist() == [123, 123]


def test_config_validation_and_round_trip():
    c = config(arch="llama")
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(Exception, match="n_heads"):
        ModelConfig(dim=64, n_heads=5)
    with pytest.raises(Exception, match="unknown"):
        ModelConfig.from_dict({"dims": 3})
    with pytest.raises(Exception, match="mixtral"):
        ModelConfig(arch="mixtral")
    full = preset("full")
    model_flops = flops_per_token(full, 1000)
    assert 1.1e9 < model_flops < 1.4e9  # 6 * ~200M backbone parameters + attention


def test_full_preset_is_about_220m_parameters():
    with torch.device("meta"):
        model = CodecLM(preset("full"))
    total = sum(p.numel() for p in model.parameters())
    assert 200e6 < total < 240e6


# ----------------------------------------------------------------------------- continuation and in-fill


def test_window_examples_continuation_and_infill_layout():
    rng = np.random.default_rng(0)
    window = np.arange(K * 40).reshape(K, 40) % V
    cfg = tasks.TaskConfig(cond_dropout_p=0.0)
    ex = tasks.window_examples([window] * 400, rng, cfg, infill_p=0.5)
    infills = [e for e in ex if e.prompt_split >= 0]
    assert 0.4 < len(infills) / len(ex) < 0.6 and all(len(e.text) == 0 for e in ex)
    for e in ex:  # every frame of the window is in the prompt or the response, in order
        if e.prompt_split >= 0:
            a = e.prompt_split
            rebuilt = np.concatenate([e.prompt[:, :a], e.codes, e.prompt[:, a:]], axis=1)
        else:
            rebuilt = np.concatenate([e.prompt, e.codes], axis=1)
        assert np.array_equal(rebuilt, window)
    e = infills[0]
    b = tasks.collate([e], V)
    p0 = 2
    assert b.segment[0, p0 + e.prompt_split] == tasks.SEP
    assert (b.segment[0] == tasks.PROMPT).sum() == e.prompt.shape[1]
    assert (b.prompt[0, :, p0 + e.prompt_split + 1] == e.prompt[:, e.prompt_split]).all()


def test_sep_is_embedded_and_trains():
    model = model_for("transformer").train()
    rng = np.random.default_rng(1)
    window = rng.integers(0, V, size=(K, 30))
    ex = tasks.window_examples([window] * 6, rng, tasks.TaskConfig(), infill_p=1.0)
    out = model(Batch.from_numpy(tasks.collate(ex, V)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.sep_emb.grad is not None and model.sep_emb.grad.abs().sum() > 0
