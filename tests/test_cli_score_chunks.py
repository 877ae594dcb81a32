"""valle score-chunks through the real command, on a tiny quantized espeak corpus."""

from __future__ import annotations

import io
import shutil

import numpy as np
import polars as pl
import pytest
from conftest import run_valle

from valle_cli import formats
from valle_cli.data.chunks import ChunkParams, score_chunks, score_codes_folder
from valle_cli.errors import CodecMismatchError, FormatError, PartialFailure

TINY = ["--codebooks", "2", "--codebook-size", "32", "--fit-seconds", "20", "-q"]
SCORE_COLUMNS = ["rms_db", "shape_flux", "magnitude_flux", "novelty", "stability", "priority", "void"]


@pytest.fixture(scope="module")
def work(espeak_corpus, tmp_path_factory):
    """audio/ (a copy of two speakers of the corpus), codes/ quantized from it with a tiny fitted
    codec (codes/codec.safetensors) and chunks.parquet scored by the command."""
    root = tmp_path_factory.mktemp("score")
    for spk in ("spk00", "spk01"):
        shutil.copytree(espeak_corpus / spk, root / "audio" / spk)
    res = run_valle("quantize", root / "audio", "-o", root / "codes", *TINY)
    assert res.returncode == 0, res.stderr.decode()
    res = run_valle("score-chunks", root / "codes", "-o", root / "chunks.parquet")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == b""
    (root / "stderr.txt").write_bytes(res.stderr)
    return root


def test_output_columns_metadata_and_layout(work):
    df, meta = formats.read_chunk_scores(work / "chunks.parquet")
    assert df.columns[:13] == ["id", "chunk_idx", "frame_start", "frame_len", "frame_rate", "codec", *SCORE_COLUMNS]
    assert meta["kind"] == "chunk-scores" and meta["format_version"] == formats.CHUNK_SCORES_FORMAT_VERSION
    params = meta["params"]
    assert params["chunk_frames"] == 56 and params["frame_rate"] == 75.0 and params["novelty"] == "crossover"
    assert params["fast_seconds"] == 4.0 and params["slow_seconds"] == 90.0 and params["void_db"] == -50.0
    assert meta["codec"]["name"] == "builtin" and meta["incomplete"] == {} and meta["sources"] == 8
    # every frame of every source is in exactly one chunk; only a source's last chunk is short
    manifest = formats.read_manifest(work / "codes")
    per_source = df.group_by("id").agg(pl.col("frame_len").sum(), pl.len().alias("n"), pl.col("chunk_idx").max())
    joined = per_source.join(manifest.select("id", "frames"), on="id")
    assert len(joined) == 8 and (joined["frame_len"] == joined["frames"]).all()
    assert (joined["chunk_idx"] == joined["n"] - 1).all()
    assert (df["frame_start"] == df["chunk_idx"] * 56).all()
    assert (df["features_from"] == "original").all()
    assert df["novelty"].min() >= 0 and df["novelty"].max() <= 1 and df["priority"].min() >= 0
    assert np.isfinite(df.select(SCORE_COLUMNS[:-1]).to_numpy()).all()
    err = (work / "stderr.txt").read_text()
    assert "8 source(s) scored" in err and "h/min" in err and "void" in err


def test_library_gives_the_cli_result_and_round_trips(work, tmp_path):
    cli, cli_meta = formats.read_chunk_scores(work / "chunks.parquet")
    result = score_codes_folder(work / "codes", ChunkParams(), workers=2)
    result.write(tmp_path / "lib.parquet")
    lib, lib_meta = formats.read_chunk_scores(tmp_path / "lib.parquet")
    assert lib.equals(cli) and lib_meta == cli_meta
    formats.write_chunk_scores(tmp_path / "again.parquet", lib, lib_meta["params"], codec=lib_meta["codec"])
    again, again_meta = formats.read_chunk_scores(tmp_path / "again.parquet")
    assert again.equals(lib) and again_meta["params"] == lib_meta["params"]


def test_stdout_carries_the_parquet(work):
    res = run_valle("score-chunks", work / "codes", "-o", "-", "-q")
    assert res.returncode == 0 and res.stderr == b""
    piped = pl.read_parquet(io.BytesIO(res.stdout))
    assert piped.equals(formats.read_chunk_scores(work / "chunks.parquet")[0])


def test_rerun_skips_and_overwrite_redoes_with_a_plot(work, tmp_path):
    out = work / "chunks.parquet"
    before = out.stat().st_mtime_ns
    res = run_valle("score-chunks", work / "codes", "-o", out)
    assert res.returncode == 0 and b"exists, skipping" in res.stderr and out.stat().st_mtime_ns == before
    copy = tmp_path / "chunks.parquet"
    shutil.copy(out, copy)
    res = run_valle("score-chunks", work / "codes", "-o", copy, "--overwrite", "--chunk-seconds", "1.0",
                    "--plot", tmp_path / "plot.png", "--plot-source", "spk01/spk01_0002")
    assert res.returncode == 0, res.stderr.decode()
    assert formats.read_chunk_scores(copy)[1]["params"]["chunk_frames"] == 75
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_features_from_decoded_codes_when_the_audio_is_gone(work, tmp_path):
    gone = tmp_path / "moved-away"
    shutil.move(work / "audio", gone)
    try:
        res = run_valle("score-chunks", work / "codes", "-o", tmp_path / "decoded.parquet", "--device", "cpu")
    finally:
        shutil.move(gone, work / "audio")
    assert res.returncode == 0, res.stderr.decode()
    assert b"8 from decoded codes" in res.stderr
    decoded, _ = formats.read_chunk_scores(tmp_path / "decoded.parquet")
    original, _ = formats.read_chunk_scores(work / "chunks.parquet")
    assert (decoded["features_from"] == "decoded").all()
    assert decoded.select("id", "chunk_idx", "frame_start", "frame_len").equals(
        original.select("id", "chunk_idx", "frame_start", "frame_len"))
    # the tiny codec's resynthesis is rough, but the loudness and the scores survive it
    assert np.abs(decoded["rms_db"].to_numpy() - original["rms_db"].to_numpy()).mean() < 6.0
    assert np.corrcoef(decoded["priority"].to_numpy(), original["priority"].to_numpy())[0, 1] > 0.7


def test_unreadable_source_is_listed_and_the_rest_written(work, tmp_path):
    codes = tmp_path / "codes"
    shutil.copytree(work / "codes", codes)
    manifest = formats.read_manifest(codes)
    (tmp_path / "junk.wav").write_text("not audio at all")
    bad = manifest["id"][3]
    rows = manifest.with_columns(pl.when(pl.col("id") == bad).then(pl.lit(str(tmp_path / "junk.wav")))
                                 .otherwise(pl.col("source")).alias("source")).to_dicts()
    formats.write_manifest(codes, rows)
    out = tmp_path / "chunks.parquet"
    res = run_valle("score-chunks", codes, "-o", out)
    err = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1 and err[-1].startswith("Error: 1 source(s) could not be scored")
    assert any(bad in line and "junk.wav" in line for line in err)
    df, meta = formats.read_chunk_scores(out)
    assert bad not in df["id"].to_list() and df["id"].n_unique() == 7
    assert list(meta["incomplete"]) == [bad]
    # the library itself writes the good sources, then raises (the convention of quantize and decode)
    lib_out = tmp_path / "lib.parquet"
    with pytest.raises(PartialFailure, match="1 source") as info:
        score_chunks(codes, lib_out, ChunkParams(), workers=2)
    assert list(info.value.failures) == [bad]
    assert formats.read_chunk_scores(lib_out)[0].equals(df)


def test_a_folder_of_mixed_codecs_is_refused(work, tmp_path):
    import json

    codes = tmp_path / "codes"
    shutil.copytree(work / "codes", codes)
    rows = formats.read_manifest(codes).to_dicts()
    other = json.loads(rows[0]["codec"])
    other["sha256"] = "0" * 64  # another fitted codec
    rows[0]["codec"] = json.dumps(other, sort_keys=True)
    formats.write_manifest(codes, rows)
    with pytest.raises(CodecMismatchError, match="2 different codecs"):
        score_codes_folder(codes)


def test_bad_inputs_are_one_line_errors(work, tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_valle("score-chunks", tmp_path / "empty", "-o", tmp_path / "x.parquet")
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "manifest.parquet" in lines[0], lines
    (tmp_path / "plain").mkdir()
    pl.DataFrame({"id": ["a"]}).write_parquet(tmp_path / "plain" / "manifest.parquet")  # no valle metadata
    res = run_valle("score-chunks", tmp_path / "plain", "-o", tmp_path / "x.parquet")
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "without valle metadata" in lines[0], lines
    assert not (tmp_path / "x.parquet").exists()
    res = run_valle("score-chunks", work / "codes", "-o", tmp_path / "x.parquet", "--chunk-seconds", "1",
                    "--bpm", "120")
    assert res.returncode == 2 and b"not both" in res.stderr


def test_reading_foreign_or_damaged_chunk_scores_fails_clearly(work, tmp_path):
    pl.DataFrame({"id": ["a"]}).write_parquet(tmp_path / "plain.parquet")
    with pytest.raises(FormatError, match="without valle metadata"):
        formats.read_chunk_scores(tmp_path / "plain.parquet")
    with pytest.raises(FormatError, match="expected a chunk-scores file"):
        formats.read_chunk_scores(work / "codes" / "manifest.parquet")
    data = (work / "chunks.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="cut.parquet"):
        formats.read_chunk_scores(tmp_path / "cut.parquet")
    df, meta = formats.read_chunk_scores(work / "chunks.parquet")
    with pytest.raises(FormatError, match="chunk_frames"):
        formats.write_chunk_scores(tmp_path / "x.parquet", df, {"novelty": "crossover"})
    with pytest.raises(FormatError, match="priority"):
        formats.write_chunk_scores(tmp_path / "x.parquet", df.drop("priority"), meta["params"])


def test_help_starts_with_the_example():
    res = run_valle("score-chunks", "--help")
    assert res.returncode == 0
    paragraphs = [p.strip() for p in res.stdout.decode().split("\n\n") if p.strip()]
    assert paragraphs[1].startswith("Example: valle score-chunks codes/ -o chunks.parquet")
