"""Every artifact round-trips; truncated, foreign and other-version files fail with a clear message."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import polars as pl
import pytest

from valle_cli import formats
from valle_cli.errors import FormatError, InputError


def _codes() -> formats.Codes:
    rng = np.random.default_rng(0)
    return formats.Codes(
        codes=rng.integers(0, 1024, size=(8, 123)).astype(np.int16), sample_rate=24000, frame_rate=75.0,
        codec={"name": "builtin", "sha256": "ab" * 32, "path": "/x/codec.safetensors"},
        source="/data/a.wav", seconds=1.64,
    )


def test_codes_round_trip(tmp_path):
    item = _codes()
    formats.write_codes(tmp_path / "a.npz", item)
    back = formats.read_codes(tmp_path / "a.npz")
    assert np.array_equal(back.codes, item.codes) and back.codes.dtype == np.int16
    assert (back.sample_rate, back.frame_rate, back.codec, back.source, back.seconds) == (
        24000, 75.0, item.codec, "/data/a.wav", 1.64)
    head = formats.read_codes_header(tmp_path / "a.npz")
    assert head.shape == (8, 123) and head.codec == item.codec and head.source == "/data/a.wav"


def test_codes_extra_arrays_survive(tmp_path):
    item = _codes()
    item.extra = {"text": np.asarray("hello")}
    back = formats.codes_from_bytes(formats.codes_to_bytes(item))
    assert str(back.extra["text"]) == "hello"


def test_codes_npz_is_plain_numpy_without_pickle(tmp_path):
    formats.write_codes(tmp_path / "a.npz", _codes())
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:  # the FORMATS.md read snippet
        assert z["codes"].shape == (8, 123)
        assert json.loads(str(z["codec"]))["name"] == "builtin"
        assert int(z["format_version"]) == formats.CODES_FORMAT_VERSION


def test_truncated_codes_fail_clearly(tmp_path):
    data = formats.codes_to_bytes(_codes())
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="t.npz"):
        formats.read_codes(tmp_path / "t.npz")
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        formats.read_codes(tmp_path / "e.npz")


def test_foreign_and_other_version_codes_fail(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros(3))
    with pytest.raises(FormatError, match="not a valle codes file"):
        formats.read_codes(tmp_path / "f.npz")
    item = _codes()
    item.format_version = 99
    (tmp_path / "v.npz").write_bytes(formats.codes_to_bytes(item))
    with pytest.raises(FormatError, match="version 99"):
        formats.read_codes(tmp_path / "v.npz")


def test_missing_input_and_folder_input(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        formats.read_codes(tmp_path / "nope.npz")
    with pytest.raises(InputError, match="folder"):
        formats.read_codes(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with formats.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_manifest_round_trip(tmp_path):
    rows = [{"id": "spk/a", "path": "spk/a.npz", "frames": 10, "seconds": 0.13, "codec": "{}", "source": "/a.wav"}]
    formats.write_manifest(tmp_path, rows)
    df = formats.read_manifest(tmp_path)
    assert df.to_dicts() == rows


def test_phonemes_round_trip_and_kind_check(tmp_path):
    df = pl.DataFrame({"id": ["a", "b"], "text": ["Hi.", "Yes"], "lang": ["en-us"] * 2,
                       "phonemes": ["hˈaɪ.", "jˈɛs"], "tokens": [[5, 6, 7], [8, 9]]})
    tok = {"kind": "phoneme", "symbols": ["<pad>", "h"]}
    formats.write_phonemes(tmp_path / "p.parquet", df, tok, {"lang": "en-us"})
    back, meta = formats.read_phonemes(tmp_path / "p.parquet")
    assert back["tokens"].dtype == pl.List(pl.UInt16)
    assert back["tokens"].to_list() == [[5, 6, 7], [8, 9]]
    assert meta["tokenizer"] == tok and meta["settings"] == {"lang": "en-us"}
    with pytest.raises(FormatError, match="expected a codes-manifest"):
        formats.read_manifest(tmp_path / "p.parquet")
    df.write_parquet(tmp_path / "plain.parquet")
    with pytest.raises(FormatError, match="without valle metadata"):
        formats.read_phonemes(tmp_path / "plain.parquet")


def test_zip_of_other_content_is_not_codes(tmp_path):
    with zipfile.ZipFile(tmp_path / "z.npz", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(FormatError):
        formats.read_codes_header(tmp_path / "z.npz")
