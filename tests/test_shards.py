"""Training shards through the library: header, records, splits, prompts, filters, corrupt files, killed runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from valle_cli import formats
from valle_cli.data import shards
from valle_cli.data.shards import ShardOptions, ShardSet, build_shards
from valle_cli.errors import CodecMismatchError, FormatError, InputError

K, CODEBOOK, VOCAB, FRAME_RATE = 3, 32, 40, 50.0
SPEC = {"name": "builtin", "sha256": "ab" * 32, "codebook_size": CODEBOOK, "n_codebooks": K, "path": "/x.safetensors"}
TOKENIZER = {"type": "phoneme", "symbols": [f"s{i}" for i in range(VOCAB)], "vocab_size": VOCAB,
             "specials": {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}}
SPEAKERS = {"spkA": 6, "spkB": 5, "spkC": 4, "spkD": 3}


def make_inputs(root: Path, speakers: dict[str, int] = SPEAKERS, spec: dict = SPEC, seed: int = 0,
                shuffle: int | None = None) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A codes folder and a phonemes file of synthetic utterances; returns them and id -> (tokens, codes).

    ``shuffle`` writes the manifest and phonemes rows in another (seeded) order.
    """
    rng = np.random.default_rng(seed)
    codes_dir, truth, manifest, text_rows = root / "codes", {}, [], []
    for speaker, count in speakers.items():
        for i in range(count):
            uid = f"{speaker}/{speaker}_{i:04d}"
            frames = int(rng.integers(60, 200))  # 1.2 .. 4 s at 50 frames/s
            codes = rng.integers(0, CODEBOOK, size=(K, frames)).astype(np.int16)
            tokens = rng.integers(4, VOCAB, size=int(rng.integers(5, 30))).astype(np.uint16)
            formats.write_codes(codes_dir / f"{uid}.npz", formats.Codes(codes, 16000, FRAME_RATE, spec,
                                                                        seconds=frames / FRAME_RATE))
            manifest.append({"id": uid, "path": f"{uid}.npz", "frames": frames, "seconds": frames / FRAME_RATE,
                             "codec": json.dumps(spec, sort_keys=True), "source": ""})
            text_rows.append({"id": uid, "text": "x", "lang": "en-us", "phonemes": "x", "tokens": tokens.tolist()})
            truth[uid] = (tokens, codes)
    if shuffle is not None:
        random.Random(shuffle).shuffle(manifest)
        random.Random(shuffle + 1).shuffle(text_rows)
    if shuffle is None:
        formats.write_manifest(codes_dir, manifest)
    else:
        _write_manifest_unsorted(codes_dir, manifest)
    phonemes = root / "phonemes.parquet"
    formats.write_phonemes(phonemes, pl.DataFrame(text_rows), TOKENIZER, {})
    return codes_dir, phonemes, truth


def _write_manifest_unsorted(folder: Path, rows: list[dict]) -> None:
    """write_manifest sorts by id; this keeps the given order (another order of the same inputs)."""
    formats.write_parquet(folder / formats.MANIFEST_NAME, pl.DataFrame(rows),
                          {"kind": "codes-manifest", "format_version": formats.MANIFEST_FORMAT_VERSION})


@pytest.fixture
def inputs(tmp_path):
    return make_inputs(tmp_path / "in")


def build(codes, phonemes, out, **options):
    return build_shards([codes], [phonemes], out, options=ShardOptions(**{"val_fraction": 0.2, **options}))


# ----------------------------------------------------------------------------- header


def test_header_pack_unpack_round_trip():
    header = formats.ShardHeader(n_codebooks=8, codebook_size=1024, text_vocab_size=263, text_pad_id=0,
                                 text_bos_id=1, text_eos_id=2, text_unk_id=formats.NO_TOKEN, frame_rate=75.0,
                                 n_records=12, n_elements=34567, shard=3,
                                 meta={"codec": SPEC, "tokenizer": TOKENIZER, "split": "train"})
    data = formats.pack_shard_header(header)
    assert len(data) == formats.SHARD_ALIGN and data[:8] == formats.SHARD_MAGIC
    back = formats.unpack_shard_header(data)
    assert back == formats.ShardHeader(**{**header.__dict__, "header_bytes": formats.SHARD_ALIGN})
    assert formats.pack_shard_header(back) == data  # deterministic bytes

    big = formats.ShardHeader(**{**header.__dict__, "meta": {"ranks": ["x" * 100] * 100}})  # > 4096 bytes of JSON
    data = formats.pack_shard_header(big)
    assert len(data) == 3 * formats.SHARD_ALIGN
    assert formats.unpack_shard_header(data).meta == big.meta


# ----------------------------------------------------------------------------- write -> read


def test_records_round_trip_and_index_columns(inputs, tmp_path):
    codes, phonemes, truth = inputs
    report = build(codes, phonemes, tmp_path / "shards")
    assert report.utterances == {"train": 14, "val": 4} and report.shards == 2
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "index.parquet", "shard-000000.bin", "shard-000001.bin"]

    data = ShardSet(tmp_path / "shards")
    assert len(data) == len(truth)
    assert data.index.schema == pl.Schema({"id": pl.String, "speaker": pl.String, "split": pl.String,
                                           "shard": pl.Int32, "offset": pl.Int64, "text_len": pl.Int32,
                                           "frames": pl.Int32, "seconds": pl.Float64, "weight": pl.Float64,
                                           "prompts": pl.List(pl.Int32)})
    assert (data.n_codebooks, data.codebook_size, data.text_vocab_size, data.frame_rate) == (K, CODEBOOK, VOCAB, 50)
    assert data.codec == SPEC and data.tokenizer_meta == TOKENIZER
    # rows are ordered by split, then id
    assert data.index["split"].to_list() == ["train"] * 14 + ["val"] * 4
    for name in ("train", "val"):
        ids = data.index.filter(pl.col("split") == name)["id"].to_list()
        assert ids == sorted(ids)
    for row, uid in enumerate(data.index["id"]):
        tokens, codes_ = data.record(row)
        assert tokens.dtype == np.uint16 and codes_.shape == truth[uid][1].shape
        assert np.array_equal(tokens, truth[uid][0]) and np.array_equal(codes_, truth[uid][1])
    assert (data.index["weight"] == 1.0).all()
    assert data.index["speaker"].to_list() == [uid.split("/")[0] for uid in data.index["id"]]

    # the body is a plain uint16 array after the header: np.memmap alone can read a record
    header = formats.read_shard_header(tmp_path / "shards" / "shard-000000.bin")
    assert header.meta["split"] == "train" and header.n_records == 14 and header.text_unk_id == 3
    body = np.memmap(tmp_path / "shards" / "shard-000000.bin", dtype=np.uint16, mode="r", offset=header.header_bytes)
    row = data.index.row(1, named=True)
    start = row["offset"] + row["text_len"]
    assert np.array_equal(body[start:start + K * row["frames"]].reshape(K, -1), truth[row["id"]][1])

    val = ShardSet(tmp_path / "shards", split="val")
    assert len(val) == 4 and val.index["id"].to_list() == data.index["id"].to_list()[14:]
    assert np.array_equal(val.record(-1)[1], data.record(-1)[1])


def test_shard_mb_splits_shards_without_cutting_records(inputs, tmp_path):
    codes, phonemes, truth = inputs
    limit_mb = 0.002  # 2097 bytes of body: a few records a shard
    report = build(codes, phonemes, tmp_path / "shards", shard_mb=limit_mb)
    data = ShardSet(tmp_path / "shards")
    assert report.shards == len(data.paths) > 4
    lengths = (data.index["text_len"] + K * data.index["frames"]).to_numpy()
    for number, header in enumerate(data.headers):
        rows = (data.index["shard"] == number).to_numpy()
        assert header.n_elements == lengths[rows].sum()
        assert 2 * header.n_elements <= limit_mb * 2**20 or rows.sum() == 1  # a lone record may be larger
        assert len(set(data.index.filter(rows)["split"])) == 1  # a shard holds one split
    for row, uid in enumerate(data.index["id"]):
        assert np.array_equal(data.record(row)[1], truth[uid][1])


# ----------------------------------------------------------------------------- split and prompts


def test_split_is_deterministic_and_independent_of_input_order(inputs, tmp_path):
    codes, phonemes, _ = inputs
    build(codes, phonemes, tmp_path / "a")
    codes2, phonemes2, _ = make_inputs(tmp_path / "in2", shuffle=7)
    build(codes2, phonemes2, tmp_path / "b")
    a, b = ShardSet(tmp_path / "a").index, ShardSet(tmp_path / "b").index
    assert a.select("id", "split", "prompts").equals(b.select("id", "split", "prompts"))
    assert (tmp_path / "a" / "shard-000001.bin").read_bytes() == (tmp_path / "b" / "shard-000001.bin").read_bytes()
    build(codes, phonemes, tmp_path / "c", seed=1)
    assert ShardSet(tmp_path / "c").index["id"].to_list() != a["id"].to_list()  # another --seed, another split


def test_assign_split_counts():
    ids = [f"s{i % 3}/u{i}" for i in range(100)]
    speakers = [u.split("/")[0] for u in ids]
    split, _ = shards.assign_split(ids, speakers, 0.1, "utterance", seed=0)
    assert (split == "val").sum() == 10
    split, _ = shards.assign_split(ids[:2], speakers[:2], 0.02, "utterance", seed=0)
    assert sorted(split) == ["train", "val"]  # at least one held out from two utterances on
    split, _ = shards.assign_split(ids, speakers, 0.0, "utterance", seed=0)
    assert (split == "train").all()
    split, notes = shards.assign_split(ids, ["one"] * 100, 0.2, "speaker", seed=0)
    assert (split == "train").all() and "two speakers" in notes[0]


def test_speaker_split_holds_out_whole_speakers(inputs, tmp_path):
    codes, phonemes, _ = inputs
    build(codes, phonemes, tmp_path / "shards", split_by="speaker", val_fraction=0.25)
    index = ShardSet(tmp_path / "shards").index
    by_speaker = index.group_by("speaker").agg(pl.col("split").n_unique().alias("n"), pl.col("split").first())
    assert (by_speaker["n"] == 1).all()  # no speaker in both splits
    assert 1 <= (by_speaker["split"] == "val").sum() < len(SPEAKERS)


def test_prompt_candidates_same_speaker_same_split_never_self(inputs, tmp_path):
    codes, phonemes, _ = inputs
    build(codes, phonemes, tmp_path / "shards", max_prompts=3)
    data = ShardSet(tmp_path / "shards")
    index = data.index
    for row in range(len(data)):
        cands = data.prompt_candidates(row)
        same = index.with_row_index().filter((pl.col("speaker") == index["speaker"][row])
                                             & (pl.col("split") == index["split"][row]))["index"].to_list()
        assert row not in cands and set(cands.tolist()) <= set(same)
        assert len(cands) == min(3, len(same) - 1)
        assert cands.tolist() == index["prompts"][row].to_list()
    val = data.select("val")  # a split view renumbers its rows
    for row in range(len(val)):
        assert [val.index["id"][r] for r in val.prompt_candidates(row).tolist()] == \
               [index["id"][r] for r in data.prompt_candidates(14 + row).tolist()]


# ----------------------------------------------------------------------------- filters and bad inputs


def test_filters_are_counted_by_reason(tmp_path):
    codes, phonemes, _ = make_inputs(tmp_path / "in")
    df, meta = formats.read_phonemes(phonemes)
    manifest = formats.read_manifest(codes)
    df = df.filter(pl.col("id") != "spkA/spkA_0000")  # codes only: missing transcript
    df = pl.concat([df, df.head(1).with_columns(id=pl.lit("spkZ/ghost"))])  # phonemes only: missing codes
    df = df.with_columns(tokens=pl.when(pl.col("id") == "spkA/spkA_0001").then(pl.lit([], pl.List(pl.UInt16)))
                         .otherwise(pl.col("tokens")))  # empty transcript
    formats.write_phonemes(phonemes, df, meta["tokenizer"], {})
    (codes / "spkB" / "spkB_0000.npz").unlink()  # listed in the manifest, file gone: missing codes
    seconds = dict(zip(manifest["id"], manifest["seconds"], strict=True))
    texts = dict(zip(df["id"], df["tokens"].list.len(), strict=True))

    report = build(codes, phonemes, tmp_path / "shards", min_seconds=2.0, max_seconds=3.5, max_text_tokens=20)
    assert report.only_in == {"codes": 1, "phonemes": 1}
    assert report.filtered["missing transcript"] == 2 and report.filtered["missing codes"] == 2
    assert report.examples["missing codes"] == ["spkB/spkB_0000", "spkZ/ghost"]
    rest = [u for u in seconds if u not in ("spkA/spkA_0000", "spkA/spkA_0001", "spkB/spkB_0000")]
    assert report.filtered["too short"] == sum(seconds[u] < 2.0 for u in rest)
    assert report.filtered["too long"] == sum(seconds[u] > 3.5 for u in rest)
    assert report.filtered["text too long"] == sum(2.0 <= seconds[u] <= 3.5 and texts[u] > 20 for u in rest)
    kept = sum(report.utterances.values())
    assert kept == len(seconds) + 1 - sum(report.filtered.values()) and kept > 0
    assert ShardSet(tmp_path / "shards").meta["filtered"] == report.filtered


def test_empty_after_filtering_is_an_error_and_writes_nothing(inputs, tmp_path):
    codes, phonemes, _ = inputs
    with pytest.raises(InputError, match="no utterance left to shard .*18 too short"):
        build(codes, phonemes, tmp_path / "shards", min_seconds=100, max_seconds=200)
    assert not (tmp_path / "shards").exists()


def test_codec_mismatch_between_folders_and_within_a_folder(inputs, tmp_path):
    codes, phonemes, _ = inputs
    other, _, _ = make_inputs(tmp_path / "other", speakers={"spkX": 2}, spec={**SPEC, "sha256": "cd" * 32})
    with pytest.raises(CodecMismatchError, match="differ"):
        build_shards([codes, other], [phonemes], tmp_path / "shards")
    rows = formats.read_manifest(codes).to_dicts()
    rows[0]["codec"] = json.dumps({**SPEC, "sha256": "cd" * 32})
    formats.write_manifest(codes, rows)
    with pytest.raises(CodecMismatchError, match="mixes codecs"):
        build(codes, phonemes, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_chunk_scores_give_normalised_weights(inputs, tmp_path):
    codes, phonemes, _ = inputs
    ids = formats.read_manifest(codes)["id"].to_list()
    scored = ids[:-2]  # the last two have no scores: they get the mean weight
    rows = [{"id": u, "chunk_idx": c, "frame_start": 25 * c, "frame_len": 25, "priority": (i % 4) * 0.25 + 0.1 * c}
            for i, u in enumerate(scored) for c in range(2)]
    df = pl.DataFrame(rows).with_columns(
        frame_rate=pl.lit(FRAME_RATE), codec=pl.lit(json.dumps(SPEC, sort_keys=True)),
        **{name: pl.lit(0.0) for name in ("rms_db", "shape_flux", "magnitude_flux", "novelty", "stability")},
        void=pl.lit(False))
    formats.write_chunk_scores(tmp_path / "chunks.parquet", df, {"chunk_frames": 25, "frame_rate": FRAME_RATE})
    report = build_shards([codes], [phonemes], tmp_path / "shards", chunks=[tmp_path / "chunks.parquet"])
    assert report.unscored == 2
    index = ShardSet(tmp_path / "shards").index
    weight = dict(zip(index["id"], index["weight"], strict=True))
    assert np.isclose(np.mean(list(weight.values())), 1.0)
    raw = {u: (i % 4) * 0.25 + 0.05 for i, u in enumerate(scored)}
    mean = np.mean(list(raw.values()))
    assert all(np.isclose(weight[u], raw[u] / mean) for u in scored)
    assert np.isclose(weight[ids[-1]], 1.0)

    formats.write_chunk_scores(tmp_path / "chunks.parquet", df.with_columns(codec=pl.lit(json.dumps({"name": "dac"}))),
                               {"chunk_frames": 25, "frame_rate": FRAME_RATE})
    with pytest.raises(CodecMismatchError, match="chunk scores"):
        build_shards([codes], [phonemes], tmp_path / "other", chunks=[tmp_path / "chunks.parquet"])


def test_speaker_column_wins_over_folders(inputs, tmp_path):
    codes, phonemes, _ = inputs
    df, meta = formats.read_phonemes(phonemes)
    formats.write_parquet(phonemes, df.with_columns(speaker=pl.lit("narrator")),
                          {"kind": "phonemes", "format_version": 1, "tokenizer": meta["tokenizer"], "settings": {}})
    build(codes, phonemes, tmp_path / "shards")
    assert set(ShardSet(tmp_path / "shards").index["speaker"]) == {"narrator"}


# ----------------------------------------------------------------------------- damaged outputs


def test_damaged_shards_are_refused_naming_the_file(inputs, tmp_path):
    codes, phonemes, _ = inputs
    out = tmp_path / "shards"
    build(codes, phonemes, out)
    shard = out / "shard-000000.bin"
    good = shard.read_bytes()

    shard.write_bytes(good[:-2])
    with pytest.raises(FormatError, match=r"shard-000000\.bin: truncated shard"):
        ShardSet(out)
    shard.write_bytes(b"\x00" * 4096 + good[4096:])
    with pytest.raises(FormatError, match=r"shard-000000\.bin: not a valle shard \(bad magic"):
        ShardSet(out)
    shard.write_bytes(good[:8] + (2).to_bytes(4, "little") + good[12:])
    with pytest.raises(FormatError, match=r"shard-000000\.bin: shard format version 2"):
        ShardSet(out)
    shard.write_bytes(good)
    ShardSet(out)

    index, meta = formats.read_shard_index(out)
    formats.write_shard_index(out, index.with_columns(offset=pl.col("offset") + 10_000), meta)
    with pytest.raises(FormatError, match=r"shard-000000\.bin: index\.parquet has rows past its end"):
        ShardSet(out)
    with pytest.raises(InputError, match="no shard index"):
        ShardSet(tmp_path)


# ----------------------------------------------------------------------------- killed runs, reruns


def test_killed_run_leaves_no_index_and_rerun_is_byte_identical(inputs, tmp_path, monkeypatch):
    codes, phonemes, _ = inputs
    reference = tmp_path / "reference"
    build(codes, phonemes, reference, shard_mb=0.002)

    out = tmp_path / "shards"
    real, calls = shards.read_record, []

    def dies_in_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the first shard holds fewer records: this is mid-way through a later one
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "read_record", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build(codes, phonemes, out, shard_mb=0.002)
    left = sorted(p.name for p in out.iterdir())
    assert "index.parquet" not in left and left and all(name.startswith("shard-") for name in left)
    assert len(left) < len(list(reference.glob("shard-*.bin")))
    for name in left:  # every file with a final name is complete
        formats.read_shard_header(out / name)
        assert (out / name).read_bytes() == (reference / name).read_bytes()

    monkeypatch.setattr(shards, "read_record", real)
    build(codes, phonemes, out, shard_mb=0.002)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.glob("shard-*.bin"):
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_rerun_skips_and_overwrite_removes_stale_shards(inputs, tmp_path):
    codes, phonemes, _ = inputs
    out = tmp_path / "shards"
    first = build(codes, phonemes, out, shard_mb=0.002)
    assert first.shards > 2
    assert build(codes, phonemes, out).skipped
    again = build_shards([codes], [phonemes], out, options=ShardOptions(val_fraction=0.2), overwrite=True)
    assert again.shards == 2
    assert sorted(p.name for p in out.iterdir()) == ["index.parquet", "shard-000000.bin", "shard-000001.bin"]
    assert len(ShardSet(out)) == 18
    (out / ".shard-000009.bin.tmp-999999999").write_bytes(b"left by a killed run")
    build_shards([codes], [phonemes], out, overwrite=True)
    assert not (out / ".shard-000009.bin.tmp-999999999").exists()
