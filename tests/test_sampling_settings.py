"""Generation settings by name: a run's TOML [sample] table travels with its checkpoints and is what a
plain `valle sample` uses; flags still win; every manifest folder records what made it (samples.json)."""

from __future__ import annotations

import json

import pytest
from conftest import one_error_line, run_valle

from valle_cli import formats
from valle_cli.errors import InputError
from valle_cli.generation.params import GenerateConfig, check_settings, with_settings

RECIPE = """
[sample]
mode = "nar-len"
steps = 3
max_seconds = 0.5
ar_temperature = 0.5
"top-k" = 20
"""


def test_settings_are_typed_checked_and_applied_per_pass():
    settings = check_settings({"ar-temperature": "0.5", "top_k": 20, "steps": 4.0, "mode": "ar+nar"}, "here")
    assert settings == {"ar_temperature": 0.5, "top_k": 20, "steps": 4, "mode": "ar+nar"}
    config = with_settings(GenerateConfig(), settings)
    assert config.ar.temperature == 0.5 and config.nar.temperature == GenerateConfig().nar.temperature
    assert config.ar.top_k == config.nar.top_k == config.demask.top_k == 20 and config.steps == 4
    for bad, message in [({"temprature": 1}, "unknown generation setting 'temprature'"),
                         ({"top_k": "many"}, "top_k = 'many' is not a int"), ({"steps": 2.5}, "is not a int"),
                         ({"mode": "fast"}, "mode 'fast': expected one of"), ({"max_seconds": 0}, "max_seconds > 0")]:
        with pytest.raises(InputError, match=message):
            check_settings(bad, "run.toml [sample]")


def test_the_recipe_sample_table_is_the_default_of_valle_sample_and_flags_win(tiny_run, espeak_corpus, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(RECIPE)
    run = tmp_path / "run"
    res = run_valle("train", tiny_run / "shards", "-o", run, "--config", toml, "--preset", "tiny", "--max-steps", "1",
                    "--batch-tokens", "2000", "--device", "cpu", "-q")
    assert res.returncode == 0, res.stderr.decode()
    expected = {"mode": "nar-len", "steps": 3, "max_seconds": 0.5, "ar_temperature": 0.5, "top_k": 20}
    assert json.loads((run / "config.json").read_text())["sampling"] == expected
    saved = json.loads((run / "checkpoints" / "step-0000001" / "config.json").read_text())
    assert saved["sampling"] == expected

    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    (tmp_path / "rows.csv").write_text(f"a|Hello there.|{prompt}\n")
    plain = tmp_path / "plain"
    assert run_valle("sample", run, "--manifest", tmp_path / "rows.csv", "-o", plain, "--seed", "0",
                     "--device", "cpu", "-q").returncode == 0
    info = formats.read_samples_info(plain)
    assert info["step"] == 1 and info["checkpoint"].endswith("step-0000001")
    assert info["max_seconds"] == pytest.approx(0.5, abs=1 / 75)  # the cap in whole frames
    assert info["params"]["mode"] == "nar-len" and info["params"]["steps"] == 3
    assert info["params"]["ar"]["temperature"] == 0.5 and info["params"]["demask"]["top_k"] == 20

    flagged = tmp_path / "flagged"
    assert run_valle("sample", run, "--manifest", tmp_path / "rows.csv", "-o", flagged, "--mode", "ar+nar",
                     "--max-seconds", "0.3", "--ar-temperature", "0.9", "--seed", "0", "--device", "cpu",
                     "-q").returncode == 0
    info = formats.read_samples_info(flagged)
    assert info["params"]["mode"] == "ar+nar" and info["max_seconds"] == pytest.approx(0.3, abs=0.02)
    assert info["params"]["ar"]["temperature"] == 0.9 and info["params"]["ar"]["top_k"] == 20  # the rest stays
    assert formats.read_codes(flagged / "a.npz").seconds <= 0.3 + 0.02


def test_a_bad_sample_table_is_refused_before_training(tiny_run, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[sample]\nar_temprature = 0.5\n')
    line = one_error_line(run_valle("train", tiny_run / "shards", "-o", tmp_path / "run", "--config", toml,
                                    "--preset", "tiny", "--max-steps", "1", "--device", "cpu"))
    assert line == f"Error: {toml} [sample]: unknown generation setting 'ar_temprature'"
    assert not (tmp_path / "run").exists()


def test_samples_info_round_trips_and_checks_its_version(tmp_path):
    formats.write_samples_info(tmp_path, "run/checkpoints/step-0000005", 5, 6.0, {"mode": "ar+nar"})
    info = formats.read_samples_info(tmp_path)
    assert info == {"kind": "valle-samples", "format_version": 1, "checkpoint": "run/checkpoints/step-0000005",
                    "step": 5, "max_seconds": 6.0, "params": {"mode": "ar+nar"}}
    assert formats.read_samples_info(tmp_path / "nothing") is None
    (tmp_path / "samples.json").write_text(json.dumps({**info, "format_version": 2}))
    with pytest.raises(Exception, match="format version 2 is not supported"):
        formats.read_samples_info(tmp_path)
