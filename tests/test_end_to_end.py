"""The whole pipeline on CPU, as a user runs it: quantize -> phonemize -> shard -> train -> sample | decode."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import run_valle

from valle_cli import formats

TRAIN = ["--preset", "tiny", "--max-steps", "6", "--batch-tokens", "3000", "--log-every", "2", "--eval-every", "6",
         "--save-every", "6", "--device", "cpu", "--set", "prompt_seconds=[0.5,1.0]"]


def ok(res) -> None:
    assert res.returncode == 0, res.stderr.decode()


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run


def test_checkpoint_is_self_contained(run):
    folder = run / "run" / "checkpoints" / "step-0000006"
    assert (folder / "codec.safetensors").is_file()  # the fitted codec travels with the model
    meta = json.loads((folder / "config.json").read_text())
    assert meta["text_settings"]["lang"] and meta["sample_rate"] == 24000 and meta["codec"]["name"] == "builtin"


def test_sample_pipes_into_decode(run, espeak_corpus):
    prompt = sorted((espeak_corpus / "spk01").glob("*.wav"))[0]
    sample = run_valle("sample", run / "run", "--text", "Hello there.", "--prompt", prompt, "-o", "-",
                       "--max-seconds", "1", "--seed", "0", "--device", "cpu")
    ok(sample)
    assert sample.stdout[:2] == b"PK"  # an npz on stdout, nothing else
    item = formats.codes_from_bytes(sample.stdout)
    assert item.codes.shape[0] == 3 and 1 <= item.codes.shape[1] <= 75  # 1 s at 75 frames/s
    decode = run_valle("decode", "-", "-o", "-", input=sample.stdout)
    ok(decode)
    wav, rate = sf.read(io.BytesIO(decode.stdout))
    assert rate == 24000 and len(wav) > 0 and np.isfinite(wav).all()
    again = run_valle("sample", run / "run", "--text", "Hello there.", "--prompt", prompt, "-o", "-",
                      "--max-seconds", "1", "--seed", "0", "--device", "cpu")
    assert again.stdout == sample.stdout  # --seed makes it reproducible


def test_long_form_nar_len_and_codes_prompts(run, tmp_path):
    codes_prompt = sorted((run / "codes" / "spk00").glob("*.npz"))[0]
    out = tmp_path / "long.npz"
    ok(run_valle("sample", run / "run", "--text", "One sentence. And another one!", "--prompt", codes_prompt,
                 "--prompt", codes_prompt, "-o", out, "--max-seconds", "0.5", "--device", "cpu",
                 "--ar-temperature", "0.7", "--top-k", "20"))
    item = formats.read_codes(out)
    assert item.extra["segments"].tolist() and item.extra["segments"].sum() == item.codes.shape[1]
    assert len(item.extra["segments"]) == 2
    nar = tmp_path / "nar.npz"
    ok(run_valle("sample", run / "run", "--text", "Hello.", "--prompt", codes_prompt, "-o", nar, "--mode",
                 "nar-len", "--duration", "0.4", "--steps", "3", "--device", "cpu"))
    assert formats.read_codes(nar).codes.shape == (3, 30)


def test_manifest_batch_mode_and_rerun(run, espeak_corpus, tmp_path):
    prompt = sorted((espeak_corpus / "spk02").glob("*.wav"))[0]
    table = tmp_path / "rows.csv"
    table.write_text(f"id|text|prompt\na|Good morning.|{prompt}\nb|See you soon.|{prompt}+{prompt}\n"
                     f"c|Two here. Yes two.|{prompt}\n")
    res = run_valle("sample", run / "run", "--manifest", table, "-o", tmp_path / "out", "--max-seconds", "0.5",
                    "--device", "cpu")
    ok(res)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npz")) == ["a.npz", "b.npz", "c.npz"]
    res = run_valle("sample", run / "run", "--manifest", table, "-o", tmp_path / "out", "--device", "cpu")
    ok(res)
    assert "0 sampled, 3 already done" in " ".join(res.stderr.decode().split())
    ok(run_valle("decode", tmp_path / "out", "-o", tmp_path / "wav", "-q"))
    assert len(list((tmp_path / "wav").glob("*.wav"))) == 3


def _one_error_line(res) -> str:
    lines = [line for line in res.stderr.decode().splitlines() if line.strip()]
    assert res.returncode == 1 and lines and lines[-1].startswith("Error: "), res.stderr.decode()
    return lines[-1]


def test_bad_sample_inputs(run, espeak_corpus, tmp_path):
    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    base = ["sample", run / "run", "--device", "cpu", "--max-seconds", "0.2"]
    assert "give --text and --prompt" in _one_error_line(run_valle(*base, "--text", "Hi.", "-o", "-"))
    assert "no such file" in _one_error_line(run_valle(*base, "--text", "Hi.", "--prompt", tmp_path / "x.wav",
                                                       "-o", tmp_path / "o.npz"))
    # codes of another codec as the prompt
    other = formats.Codes(codes=np.zeros((3, 10), np.int16), sample_rate=24000, frame_rate=75.0,
                          codec={"name": "encodec", "bandwidth": 3.0})
    formats.write_codes(tmp_path / "other.npz", other)
    line = _one_error_line(run_valle(*base, "--text", "Hi.", "--prompt", tmp_path / "other.npz", "-o", "-"))
    assert "made by encodec" in line
    assert run_valle(*base, "--text", "Hi.", "--prompt", prompt, "-o", "-", "--bogus", "1").returncode == 2
    assert run_valle(*base, "--text", "Hi.", "--prompt", prompt, "-o", "-", "--top-k", "x").returncode == 2
    assert "no such checkpoint" in _one_error_line(run_valle("sample", tmp_path / "nope", "--text", "Hi.",
                                                             "--prompt", prompt, "-o", "-"))
    help_text = " ".join(run_valle("sample", "--help").stdout.decode().split())
    assert help_text.startswith("Usage") and "Example: valle sample run/" in help_text


def test_audio_continuation_and_infill_pipeline(run, tmp_path):
    """score-chunks -> shard --no-text -> train --task continuation --chunks -> sample --continue / --infill."""
    ok(run_valle("score-chunks", run / "codes", "-o", tmp_path / "chunks.parquet", "-q"))
    ok(run_valle("shard", run / "codes", "--no-text", "-o", tmp_path / "shards", "--chunks",
                 tmp_path / "chunks.parquet", "-q"))
    ok(run_valle("train", tmp_path / "shards", "-o", tmp_path / "run", "--task", "continuation", "--chunks",
                 tmp_path / "chunks.parquet", "--set", "window_seconds=1.0", "--set", "windows_per_batch=3",
                 *TRAIN))
    prompt = sorted((run / "codes" / "spk01").glob("*.npz"))[0]
    res = run_valle("sample", tmp_path / "run", "--prompt", prompt, "--continue-seconds", "0.2", "--rollouts", "2",
                    "-o", "-", "--device", "cpu", "--seed", "1")
    ok(res)
    tape = formats.codes_from_bytes(res.stdout)
    original = formats.read_codes(prompt).codes
    assert tape.extra["segments"].tolist() == [original.shape[1], 15, 15]
    assert np.array_equal(tape.codes[:, :original.shape[1]], original)
    ok(run_valle("decode", "-", "-o", tmp_path / "tape.wav", input=res.stdout))
    res = run_valle("sample", tmp_path / "run", "--prompt", prompt, "--continue-seconds", "0.2", "--chunks",
                    tmp_path / "chunks.parquet", "--context-seconds", "0.5", "-o", "-", "--device", "cpu")
    ok(res)
    picked = formats.codes_from_bytes(res.stdout)
    head = int(picked.extra["segments"][0])
    assert 1 <= head <= 38  # the window that ends with the top-priority chunk, not the whole prompt
    start = next(i for i in range(original.shape[1] - head + 1)
                 if np.array_equal(original[:, i:i + head], picked.codes[:, :head]))
    assert start >= 0
    res = run_valle("sample", tmp_path / "run", "--prompt", prompt, "--infill-suffix", prompt, "--duration", "0.1",
                    "-o", tmp_path / "infill.npz", "--device", "cpu")
    ok(res)
    assert formats.read_codes(tmp_path / "infill.npz").extra["segments"].tolist() == [original.shape[1], 8,
                                                                                      original.shape[1]]
    assert "take no --text" in _one_error_line(run_valle("sample", tmp_path / "run", "--prompt", prompt,
                                                         "--continue-seconds", "1", "--text", "Hi.", "-o", "-"))
