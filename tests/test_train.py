"""`valle train` (the library loop): overfitting, exact resume, checkpoints, LoRA, NaN guard, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from synthetic import make_shards
from torch.optim.optimizer import register_optimizer_step_post_hook

from valle_cli import checkpoint as ckpt
from valle_cli.data.tasks import TaskConfig
from valle_cli.errors import FormatError, InputError
from valle_cli.formats import read_log
from valle_cli.model.config import preset
from valle_cli.model.load import load_model, merge_lora_checkpoint
from valle_cli.training.loop import TrainConfig, TrainingError, lr_factor, train

TINY = preset("tiny")
TASKS = TaskConfig(prompt_seconds=(0.4, 0.8))
QUICK = TrainConfig(max_steps=8, batch_tokens=400, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4,
                    save_every=4, keep_last=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(run) if r["split"] == "train"]


def test_a_tiny_model_overfits_a_handful_of_utterances(tmp_path):
    data = make_shards(tmp_path / "data", n_speakers=2, per_speaker=3, val_fraction=0.0)
    tasks = TaskConfig(prompt_seconds=(0.4, 0.8), cond_dropout_p=0.0, prompt_dropout_p=0.0)
    config = TrainConfig(max_steps=150, batch_tokens=2000, lr=4e-3, warmup_steps=10, log_every=10,
                         eval_every=1000, save_every=1000, schedule="cosine")
    report = train(data, tmp_path / "run", TINY, tasks, config, device="cpu")
    curve = losses(tmp_path / "run")
    assert report.steps == 150 and len(curve) == 15
    start, end = curve[0][1], np.mean([loss for _, loss in curve[-3:]])
    assert end < 0.4 * start, curve  # e.g. 3.3 -> 0.5 (the last windows: 0.59, 0.82, 0.18)
    tasks_at_end = read_log(tmp_path / "run")[-1]["tasks"]
    assert tasks_at_end["nar1"]["acc"] > 0.9


def test_resume_continues_exactly_like_an_uninterrupted_run(shards, tmp_path):
    straight = tmp_path / "straight"
    train(shards, straight, TINY, TASKS, QUICK, device="cpu")

    cut = tmp_path / "cut"

    def interrupt(info):
        if info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(shards, cut, TINY, TASKS, QUICK, device="cpu", on_step=interrupt)
    assert ckpt.resolve_checkpoint(cut).name == "step-0000005"  # Ctrl-C saved the finished steps
    report = train(shards, cut, TINY, TASKS, QUICK, device="cpu", resume=True)
    assert report.start_step == 5 and report.steps == 8
    assert losses(cut) == losses(straight)  # bit for bit on CPU
    a = ckpt.load_weights(ckpt.resolve_checkpoint(straight))
    b = ckpt.load_weights(ckpt.resolve_checkpoint(cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_while_a_step_is_applied_still_resumes_exactly(shards, tmp_path):
    # A real SIGINT, delivered between save steps at the worst moment: AdamW has just moved the weights
    # of step 7 and the step counter, schedule and sampler position have not followed yet. The
    # checkpoint Ctrl-C writes must be the state of one whole step, so every loss logged after the
    # resume equals the uninterrupted run's.
    config = replace(QUICK, max_steps=10, save_every=5, eval_every=1000)
    straight = tmp_path / "straight"
    train(shards, straight, TINY, TASKS, config, device="cpu")

    steps_applied = 0

    def ctrl_c_after_the_weights_moved(optimizer, args, kwargs):
        nonlocal steps_applied
        steps_applied += 1
        if steps_applied == 7:
            signal.raise_signal(signal.SIGINT)

    cut = tmp_path / "cut"
    hook = register_optimizer_step_post_hook(ctrl_c_after_the_weights_moved)
    # Python's own handler, as in `valle train`: a library loaded by an earlier test may have left its own.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(shards, cut, TINY, TASKS, config, device="cpu")
    finally:
        hook.remove()
        signal.signal(signal.SIGINT, handler)
    assert ckpt.resolve_checkpoint(cut).name == "step-0000007"
    train(shards, cut, TINY, TASKS, config, device="cpu", resume=True)
    assert losses(cut)[7:] == losses(straight)[7:] and losses(cut) == losses(straight)


def test_resume_from_a_killed_run_drops_log_lines_past_the_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, TINY, TASKS, replace(QUICK, max_steps=4), device="cpu")
    with open(run / "log.jsonl", "a") as f:  # a killed run logged step 5 but never saved it
        f.write(json.dumps({"step": 5, "split": "train", "loss": 9.9, "tasks": {}}) + "\n")
    train(shards, run, TINY, TASKS, replace(QUICK, max_steps=6), device="cpu", resume=True)
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6] and 9.9 not in dict(losses(run)).values()


def test_run_folder_layout_checkpoints_and_round_trip(shards, tmp_path):
    run = tmp_path / "run"
    report = train(shards, run, TINY, TASKS, QUICK, device="cpu")
    assert {"config.json", "log.jsonl", "curves.png", "checkpoints"} <= set(os.listdir(run))
    kept = [p.name for p in ckpt.list_checkpoints(run)]
    best = (run / "best").read_text().strip() if (run / "best").exists() else None
    assert kept[-1] == "step-0000008" and len(kept) <= 3 and (best is None or Path(best).name in kept)
    assert report.best_val_loss is not None
    meta = json.loads((run / "checkpoints/step-0000008/config.json").read_text())
    assert meta["format_version"] == ckpt.CHECKPOINT_FORMAT_VERSION and meta["step"] == 8
    assert meta["codec"]["name"] == "fake" and meta["model"]["n_codebooks"] == 3 and meta["tokenizer"]["vocab_size"]
    model, loaded = load_model(run)
    weights = ckpt.load_weights(run / "checkpoints/step-0000008")
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert loaded["step"] == 8 and not model.training


def test_a_checkpoint_of_another_format_version_fails_clearly(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, TINY, TASKS, replace(QUICK, max_steps=2), device="cpu")
    folder = ckpt.resolve_checkpoint(run)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(FormatError, match="format version 99"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_model(folder)
    with pytest.raises(InputError, match="no checkpoint"):
        load_model(tmp_path)


def test_a_second_run_in_the_same_folder_is_refused_unless_asked(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, TINY, TASKS, replace(QUICK, max_steps=2), device="cpu")
    with pytest.raises(InputError, match="holds a run"):
        train(shards, run, TINY, TASKS, replace(QUICK, max_steps=2), device="cpu")
    report = train(shards, run, TINY, TASKS, replace(QUICK, max_steps=2), device="cpu", overwrite=True)
    assert report.steps == 2
    done = train(shards, run, TINY, TASKS, replace(QUICK, max_steps=2), device="cpu", resume=True)
    assert done.steps == done.start_step == 2  # nothing left to do
    with pytest.raises(InputError, match="nothing to resume"):
        train(shards, tmp_path / "new", TINY, TASKS, QUICK, device="cpu", resume=True)


def test_nan_guard_skips_then_stops(shards, tmp_path, monkeypatch):
    from valle_cli.model import valle

    real = valle.CodecLM.forward

    def poisoned(self, batch):
        out = real(self, batch)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(valle.CodecLM, "forward", poisoned)
    with pytest.raises(TrainingError, match="NaN/inf for 3 steps in a row"):
        train(shards, tmp_path / "run", TINY, TASKS, replace(QUICK, nan_patience=3), device="cpu")


def test_init_from_and_lora_train_only_the_adapters_then_merge(shards, tmp_path):
    base = tmp_path / "base"
    train(shards, base, TINY, TASKS, replace(QUICK, max_steps=2), device="cpu")
    lora_run = tmp_path / "lora"
    report = train(shards, lora_run, TINY, TASKS, replace(QUICK, max_steps=3, lora_rank=4), device="cpu",
                   init_from=base)
    assert report.steps == 3
    before = ckpt.load_weights(ckpt.resolve_checkpoint(base))
    after = ckpt.load_weights(ckpt.resolve_checkpoint(lora_run))
    assert torch.equal(before["head_ar.weight"], after["head_ar.weight"])  # frozen
    wq = "backbone.layers.0.attention.wq"
    assert torch.equal(before[f"{wq}.weight"], after[f"{wq}.base.weight"])
    assert not torch.equal(after[f"{wq}.lora_B"], torch.zeros_like(after[f"{wq}.lora_B"]))
    assert (ckpt.resolve_checkpoint(lora_run) / "lora.safetensors").is_file()

    merged = merge_lora_checkpoint(lora_run, tmp_path / "merged")
    plain, meta = load_model(merged)
    adapted, _ = load_model(lora_run)
    assert meta["lora"] is None and f"{wq}.weight" in plain.state_dict()
    from valle_cli.data.shards import ShardSet
    from valle_cli.model.valle import Batch
    from valle_cli.training.loop import make_batch

    data = ShardSet(shards, split="train")
    batch = Batch.from_numpy(make_batch(data, [0, 1, 2], np.random.default_rng(0), TASKS, adapted.config))
    with torch.no_grad():
        assert torch.allclose(plain(batch).loss, adapted(batch).loss, atol=1e-5)


def test_lr_schedule_warmup_then_cosine_or_hold():
    c = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0) and lr_factor(100, c) == pytest.approx(0.1)
    assert 0.1 < lr_factor(55, c) < 1.0
    assert lr_factor(90, replace(c, schedule="hold")) == 1.0


def test_two_process_gloo_ddp_run_on_cpu(shards, tmp_path):
    """torchrun --nproc_per_node 2 -m valle_cli train ...: both ranks step together, rank 0 saves.

    Evaluating at step 3 gives a first best checkpoint off the --save-every grid: saving gathers
    every rank's sampler state, so all ranks must agree to save (a rank-0-only decision hangs)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "valle_cli", "train", str(shards), "-o", str(run), "--preset", "tiny", "--max-steps", "4",
           "--batch-tokens", "400", "--log-every", "1", "--eval-every", "3", "--save-every", "4",
           "--set", "prompt_seconds=[0.4,0.8]", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert ckpt.resolve_checkpoint(run).name == "step-0000004"
    # the best checkpoint of step 3 (not a --save-every step) was saved by every rank together: no hang
    assert (run / "checkpoints" / "step-0000003").is_dir() and (run / "best").is_file()
    state = json.loads((run / "checkpoints/step-0000004/train_state/state.json").read_text())
    assert len(state["sampler"]) == 2 and state["sampler"][0]["params"]["world_size"] == 2
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4] and all(np.isfinite(v) for _, v in losses(run))


def test_continuation_training_on_audio_only_shards_resumes_exactly(tmp_path):
    from valle_cli.data.shards import ShardOptions, build_shards

    data = make_shards(tmp_path / "data", frames=(60, 90))
    build_shards([tmp_path / "data" / "codes"], [], tmp_path / "audio_only",  # valle shard --no-text
                 options=ShardOptions(min_seconds=0.1, val_fraction=0.2))
    assert data.exists()
    cont = replace(QUICK, task="continuation", window_seconds=2.0, windows_per_batch=4, infill_p=0.5)
    straight = tmp_path / "straight"
    report = train(tmp_path / "audio_only", straight, TINY, TASKS, cont, device="cpu")
    assert report.steps == 8 and np.isfinite(report.last_loss) and report.best_val_loss is not None
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "audio_only", cut, TINY, TASKS, cont, device="cpu",
              on_step=lambda info: (_ for _ in ()).throw(KeyboardInterrupt) if info["step"] == 3 else None)
    train(tmp_path / "audio_only", cut, TINY, TASKS, cont, device="cpu", resume=True)
    assert losses(cut) == losses(straight)
    meta = json.loads((ckpt.resolve_checkpoint(straight) / "config.json").read_text())
    assert meta["train"]["task"] == "continuation" and meta["tokenizer"]["kind"] == "none"


@pytest.mark.slow
def test_compiled_backbone_trains_and_saves_plain_parameter_names(shards, tmp_path):
    run = tmp_path / "run"
    report = train(shards, run, TINY, TASKS, replace(QUICK, max_steps=2, compile=True), device="cpu")
    assert report.steps == 2 and np.isfinite(report.last_loss)
    names = ckpt.load_weights(ckpt.resolve_checkpoint(run)).keys()
    assert not any("_orig_mod" in n for n in names) and "backbone.layers.0.attention.wq.weight" in names


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "audio": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_the_logged_scalars_and_an_audio_sample(shards, tmp_path, monkeypatch, fake_codec):
    from valle_cli.training import loop

    monkeypatch.setattr(loop, "load_sample_codec", lambda data: fake_codec)  # the synthetic codes have no codec
    run = tmp_path / "run"
    train(shards, run, TINY, TASKS, replace(QUICK, max_steps=4), device="cpu")
    acc = events(run)
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/ar/loss", "train/ar/acc",
                "val/loss", "val/nar1/acc"):
        assert tag in scalars, scalars
    logged = [(r["step"], r["loss"]) for r in read_log(run) if r["split"] == "train"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(s, pytest.approx(v)) for s, v in logged]
    (sample,) = acc.Audio("val/sample")  # eval_every=4: one evaluation, at step 4
    assert sample.step == 4 and sample.sample_rate == fake_codec.sample_rate and sample.length_frames > 0

    train(shards, run, TINY, TASKS, replace(QUICK, max_steps=2), device="cpu", overwrite=True)
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the old run's events went with it
    assert [e.step for e in events(run).Scalars("train/loss")] == [1, 2]


def test_training_goes_on_without_tensorboard(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.warns(UserWarning, match="tensorboard is not importable"):
        report = train(shards, tmp_path / "run", TINY, TASKS, replace(QUICK, max_steps=2), device="cpu")
    assert report.steps == 2 and not list((tmp_path / "run").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", ["tiny", "small", "base", "full"])
def test_mixtral_gets_working_moe_sizes_at_every_preset(name):
    from valle_cli.model.config import MOE_PRESETS
    from valle_cli.training.config import resolve_config

    model, _, _ = resolve_config(name, model={"arch": "mixtral"})
    assert model.moe_experts == MOE_PRESETS[name]["moe_experts"] and 1 <= model.moe_top_k <= model.moe_experts
    assert preset(name, arch="mixtral") == model
    mine, _, _ = resolve_config(name, sets=["moe_experts=3"], model={"arch": "mixtral"})
    assert (mine.moe_experts, mine.moe_top_k) == (3, 2)  # the user's count wins; top-k fits under it
    one, _, _ = resolve_config(name, sets=["moe_experts=1"], model={"arch": "transformer"})
    assert (one.moe_experts, one.moe_top_k) == (1, 1)
    dense, _, _ = resolve_config(name, model={"arch": "llama"})
    assert dense.moe_experts == 0


def test_config_file_preset_is_used_unless_the_preset_flag_is_given(tmp_path):
    from valle_cli.training.config import resolve_config

    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\nn_layers = 3\n')
    model, _, _ = resolve_config(None, toml)
    assert model == preset("tiny", n_layers=3)
    model, _, _ = resolve_config("base", toml)  # the flag wins over the file
    assert model == preset("base", n_layers=3)
    model, _, _ = resolve_config(None)
    assert model == preset("small")
    toml.write_text('[model]\npreset = "huge"\n')
    with pytest.raises(InputError, match="preset 'huge'"):
        resolve_config(None, toml)


def test_guided_attention_trains_logs_its_penalty_and_leaves_checkpoints_plain(shards, tmp_path):
    run = tmp_path / "run"
    train(shards, run, TINY, TASKS, replace(QUICK, max_steps=4, align_loss_weight=1.0), device="cpu")
    records = read_log(run)
    for split in ("train", "val"):
        penalties = [r["tasks"]["align"]["loss"] for r in records if r["split"] == split and "align" in r["tasks"]]
        assert penalties and all(0 < p <= 1 for p in penalties)
    val = [r for r in records if r["split"] == "val"][-1]
    coded = {name: t for name, t in val["tasks"].items() if name not in ("len", "align")}
    per_code = sum(t["loss"] * t["tokens"] for t in coded.values()) / sum(t["tokens"] for t in coded.values())
    assert val["loss"] == pytest.approx(per_code, rel=1e-4)  # the penalty is not part of the validation loss
    assert (run / "curves.png").is_file()
    model = load_model(ckpt.resolve_checkpoint(run), device="cpu")[0]  # a plain model: sampling probes nothing
    assert all(layer.attention.probe_heads == 0 for layer in model.backbone.layers)


def test_bf16_autocast_trains_on_the_cpu_and_saves_fp32_weights(shards, tmp_path):
    config = replace(QUICK, max_steps=4)
    train(shards, tmp_path / "fp32", TINY, TASKS, config, device="cpu")
    report = train(shards, tmp_path / "bf16", TINY, TASKS, replace(config, precision="bf16"), device="cpu")
    assert report.steps == 4 and np.isfinite(report.last_loss)
    bf16, fp32 = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert bf16[0][1] == pytest.approx(fp32[0][1], rel=0.02)  # same batches, same start ...
    assert bf16 != fp32  # ... but computed in bf16
    val = [r["loss"] for r in read_log(tmp_path / "bf16") if r["split"] == "val"]
    assert val and all(np.isfinite(val))
    weights = ckpt.load_weights(ckpt.resolve_checkpoint(tmp_path / "bf16"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # autocast: the master weights stay fp32


def test_autocast_dtype_per_device_and_precision():
    from valle_cli.training.loop import autocast_dtype

    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("fp32", "cuda") is None


def test_flex_attention_training_on_the_cpu_is_refused_in_one_line(shards, tmp_path):
    with pytest.raises(InputError, match="--attention flex trains on a CUDA device only"):
        train(shards, tmp_path / "run", replace(TINY, attention="flex"), TASKS, QUICK, device="cpu")
