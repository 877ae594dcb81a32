"""`valle train` as a user runs it: flags, --config / --set layering, resume, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_valle
from synthetic import make_shards

from valle_cli import checkpoint as ckpt
from valle_cli.formats import read_log

FAST = ["--preset", "tiny", "--batch-tokens", "400", "--log-every", "1", "--eval-every", "3", "--save-every", "3",
        "--device", "cpu", "--set", "prompt_seconds=[0.4,0.8]"]


def _one_error_line(res) -> str:
    lines = [line for line in res.stderr.decode().splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), res.stderr.decode()
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


def test_help_starts_with_an_example_and_lists_the_knobs():
    res = run_valle("train", "--help")
    text = res.stdout.decode()
    assert res.returncode == 0 and "Example: valle train shards/ -o run/" in " ".join(text.split())
    for flag in ("--arch", "--preset", "--config", "--resume", "--lora-rank", "--compile", "--attention"):
        assert flag in text
    assert "train" in run_valle("--help").stdout.decode()
    flat = " ".join(text.split())
    for shown in ("--max-steps INTEGER Optimizer steps in all. [default: 1000]", "[default: small]",
                  "Peak learning rate (AdamW). [default: 0.0003]", "[default: transformer]"):
        assert shown in flat, flat


def test_a_tiny_mixtral_trains_with_the_preset_moe_sizes(shards, tmp_path):
    run = tmp_path / "run"
    res = run_valle("train", shards, "-o", run, "--arch", "mixtral", "--max-steps", "2", *FAST)
    assert res.returncode == 0, res.stderr.decode()
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["arch"], model["moe_experts"], model["moe_top_k"]) == ("mixtral", 4, 2)
    assert [r["step"] for r in read_log(run) if r["split"] == "train"] == [1, 2]


def test_tensorboard_audio_sample_is_decoded_by_the_run_codec(tiny_run):
    """The user's pipeline (a fitted builtin codec): the run folder has events with an audio sample."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / "run"), size_guidance={"audio": 0, "scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "val/loss" in acc.Tags()["scalars"]
    (sample,) = acc.Audio("val/sample")  # --eval-every 6 of 6 steps
    assert sample.step == 6 and sample.sample_rate > 0 and sample.length_frames > 0


def test_train_then_resume_through_the_cli(shards, tmp_path):
    run = tmp_path / "run"
    res = run_valle("train", shards, "-o", run, "--max-steps", "3", "--arch", "llama", *FAST)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == b""  # nothing but data on stdout, and train makes no stdout data
    err = " ".join(res.stderr.decode().split())
    assert "trained" in err and "steps 0..3" in err and "checkpoint:" in err
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["arch"] == "llama" and config["model"]["dim"] == 64
    assert config["tasks"]["prompt_seconds"] == [0.4, 0.8]
    res = run_valle("train", shards, "-o", run, "--max-steps", "5", "--resume", *FAST)
    assert res.returncode == 0, res.stderr.decode()
    assert "steps 3..5" in " ".join(res.stderr.decode().split())
    assert [r["step"] for r in read_log(run) if r["split"] == "train"] == [1, 2, 3, 4, 5]
    assert ckpt.resolve_checkpoint(run).name == "step-0000005"
    res = run_valle("train", shards, "-o", run, "--max-steps", "5", "--resume", *FAST)
    assert res.returncode == 0 and "already trained to step 5" in " ".join(res.stderr.decode().split())


def test_config_file_and_set_layering(shards, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nn_layers = 1\nqk_norm = true\n[tasks]\nmasked_p = 0.5\n[train]\nlr = 0.001\n')
    run = tmp_path / "run"
    res = run_valle("train", shards, "-o", run, "--config", toml, "--max-steps", "1", *FAST, "--set", "n_layers=3",
                    "--lr", "0.002")
    assert res.returncode == 0, res.stderr.decode()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_layers"] == 3 and config["model"]["qk_norm"] is True  # --set beats the file
    assert config["tasks"]["masked_p"] == 0.5 and config["train"]["lr"] == 0.002  # flags beat both


@pytest.mark.parametrize("args, message", [
    (["--set", "n_layerz=3"], "--set 'n_layerz=3'"),
    (["--set", "n_layers=three"], "expected a int"),
    (["--set", "n_heads=5"], "not a multiple of n_heads"),
    (["--config", "missing.toml"], "no such config file"),
])
def test_bad_settings_are_one_line_errors(shards, tmp_path, args, message):
    line = _one_error_line(run_valle("train", shards, "-o", tmp_path / "run", "--max-steps", "1", *FAST, *args,
                                     cwd=tmp_path))
    assert message in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_inputs(shards, tmp_path):
    assert "no shard index" in _one_error_line(run_valle("train", tmp_path, "-o", tmp_path / "r", *FAST))
    assert "missing SHARDS" in _one_error_line(run_valle("train", "-o", tmp_path / "r", *FAST))
    run = tmp_path / "run"
    assert run_valle("train", shards, "-o", run, "--max-steps", "1", *FAST).returncode == 0
    assert "holds a run already" in _one_error_line(run_valle("train", shards, "-o", run, "--max-steps", "1", *FAST))
    assert run_valle("train", shards, "-o", run, "--preset", "huge").returncode == 2  # usage error
    assert "no LoRA adapters" in _one_error_line(run_valle("train", "--merge-lora", run, "-o", tmp_path / "m"))
