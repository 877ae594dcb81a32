"""`valle shard` as a user runs it, on a tiny quantized + phonemized espeak corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_valle

from valle_cli import formats
from valle_cli.data.shards import ShardOptions, ShardSet, build_shards


def _stderr(res) -> str:
    return " ".join(res.stderr.decode().split())  # rich may wrap long lines on a narrow console


@pytest.fixture(scope="module")
def prepared(espeak_corpus, tmp_path_factory) -> Path:
    """codes/ (tiny built-in codec), phonemes.parquet, and other_codes/ made by a second codec."""
    from valle_cli.codecs.builtin import BuiltinCodec, BuiltinCodecConfig
    from valle_cli.codecs.quantize import quantize_folder, sample_for_fit
    from valle_cli.text.phonemize import phonemize_corpus

    work = tmp_path_factory.mktemp("shard")
    config = BuiltinCodecConfig(n_codebooks=2, codebook_size=32)
    wavs = sample_for_fit(espeak_corpus, config.sample_rate, 20, seed=0)
    for seed, name, source in ((0, "codes", espeak_corpus), (1, "other_codes", espeak_corpus / "spk00")):
        BuiltinCodec.fit(wavs, config, seed=seed).save(work / f"{name}.safetensors")
        quantize_folder(source, work / name, BuiltinCodec.load(work / f"{name}.safetensors"), batch_seconds=8)
    text = phonemize_corpus(str(espeak_corpus))
    formats.write_phonemes(work / "phonemes.parquet", text.df, text.tokenizer_meta, text.settings)
    return work


def test_shard_layout_summary_and_same_result_as_the_library(prepared, tmp_path):
    out = prepared / "shards"
    res = run_valle("shard", prepared / "codes", prepared / "phonemes.parquet", "-o", out, "--val-fraction", "0.2")
    assert res.returncode == 0, _stderr(res)
    assert res.stdout == b""
    err = _stderr(res)
    assert "12 utterances kept: train 10 (3 speakers" in err and "val 2 (" in err
    assert "filtered: none" in err and "2 shard(s)" in err and "utt/s" in err  # each split has its own shards
    assert sorted(p.name for p in out.iterdir()) == ["index.parquet", "shard-000000.bin", "shard-000001.bin"]

    data = ShardSet(out)
    assert (len(data), data.n_codebooks, data.codebook_size, data.codec["name"]) == (12, 2, 32, "builtin")
    for row, uid in enumerate(data.index["id"]):
        tokens, codes = data.record(row)
        assert np.array_equal(codes, formats.read_codes(prepared / "codes" / f"{uid}.npz").codes)
        assert len(tokens) == data.index["text_len"][row] > 0
    # the CLI writes what the library writes
    build_shards([prepared / "codes"], [prepared / "phonemes.parquet"], tmp_path / "lib",
                 options=ShardOptions(val_fraction=0.2))
    for name in ("shard-000000.bin", "shard-000001.bin"):
        assert (tmp_path / "lib" / name).read_bytes() == (out / name).read_bytes()
    assert ShardSet(tmp_path / "lib").index.equals(data.index)


def test_rerun_skips_then_overwrite_with_a_speaker_split(prepared):
    out = prepared / "shards2"
    args = ("shard", prepared / "codes", prepared / "phonemes.parquet", "-o", out)
    assert run_valle(*args, "-q").returncode == 0
    before = (out / "index.parquet").stat().st_mtime_ns
    res = run_valle(*args)
    assert res.returncode == 0 and "skipping (--overwrite to redo)" in _stderr(res)
    assert (out / "index.parquet").stat().st_mtime_ns == before

    # Limits from the data itself: just under the longest utterance, then just under the longest text of the rest
    unfiltered = ShardSet(out).index
    max_seconds = float(unfiltered["seconds"].max()) - 1e-3
    max_text = int(unfiltered.filter(pl.col("seconds") <= max_seconds)["text_len"].max()) - 1
    res = run_valle(*args, "--overwrite", "--split-by", "speaker", "--val-fraction", "0.3", "--shard-mb", "0.002",
                    "--max-seconds", f"{max_seconds:.4f}", "--max-text-tokens", str(max_text), "-v")
    assert res.returncode == 0, _stderr(res)
    data = ShardSet(out)
    assert len(data.paths) > 2 and sorted(p.name for p in out.glob("shard-*.bin")) == [p.name for p in data.paths]
    splits = data.index.group_by("speaker").agg(pl.col("split").unique())["split"].to_list()
    assert all(len(s) == 1 for s in splits) and sorted(s[0] for s in splits).count("val") == 1
    err = _stderr(res)
    filtered = data.meta["filtered"]
    assert filtered["too long"] and filtered["text too long"]
    assert f"filtered: {filtered['too long']} too long, {filtered['text too long']} text too long" in err
    assert len(data) == 12 - sum(filtered.values())


def test_mismatched_codecs_and_missing_inputs_are_one_line_errors(prepared, tmp_path):
    res = run_valle("shard", prepared / "codes", prepared / "other_codes", prepared / "phonemes.parquet",
                    "-o", tmp_path / "x")
    assert res.returncode == 1
    lines = res.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "builtin codec" in lines[0]
    assert not (tmp_path / "x").exists()

    res = run_valle("shard", prepared / "codes", tmp_path / "missing.parquet", "-o", tmp_path / "x")
    assert res.returncode == 1 and res.stderr.decode().strip() == f"Error: {tmp_path / 'missing.parquet'}: no such " \
                                                                     "file or folder"
    res = run_valle("shard", prepared / "codes", prepared / "phonemes.parquet", "-o", "-")
    assert res.returncode == 1 and res.stderr.decode().startswith("Error: shards are a folder of files: -o must")
    res = run_valle("shard", prepared / "codes", "-o", tmp_path / "x", "--split-by", "voice")
    assert res.returncode == 2  # usage error
    assert not (tmp_path / "x").exists()
