"""`valle phonemize` as a user runs it: inputs, pipes, reruns, bad rows, vocab reuse, exit codes."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
from conftest import run_valle

from valle_cli.codecs.audio import find_audio
from valle_cli.formats import read_phonemes
from valle_cli.text.phonemize import phonemize_corpus


def _stderr(res) -> str:
    return " ".join(res.stderr.decode().split())  # rich may wrap long lines on a narrow console


def test_text_file_rerun_and_overwrite(tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("Hello, world!\n\nDr. Smith paid $5.\n")
    out = tmp_path / "ph.parquet"
    res = run_valle("phonemize", src, "-o", out)
    assert res.returncode == 0, _stderr(res)
    assert res.stdout == b""  # stdout carries only data
    assert "phonemized 2 utterance(s), 1 blank line(s) skipped" in _stderr(res) and "utt/s" in _stderr(res)
    df, meta = read_phonemes(out)
    assert df["id"].to_list() == ["lines-000001", "lines-000003"]
    assert df["phonemes"][0] == "həlˈoʊ, wˈɜːld!"
    assert meta["tokenizer"]["type"] == "phoneme" and meta["settings"]["espeak_version"].startswith("1.52")
    # the CLI writes what the library returns
    assert df["tokens"].to_list() == phonemize_corpus(src).df["tokens"].to_list()

    before = out.stat().st_mtime_ns
    res = run_valle("phonemize", src, "-o", out)
    assert res.returncode == 0 and "exists, skipping" in _stderr(res) and out.stat().st_mtime_ns == before
    src.write_text("Something else.\n")
    res = run_valle("phonemize", src, "-o", out, "--overwrite", "-q")
    assert res.returncode == 0 and res.stderr == b""
    assert read_phonemes(out)[0]["text"].to_list() == ["Something else."]


def test_ljspeech_table_with_bpe(tmp_path):
    src = tmp_path / "metadata.csv"
    src.write_text("LJ001-0001|Printing, in the only sense|Printing, in the only sense\n"
                   "LJ001-0002|in 1984 it was|in nineteen eighty-four it was\n")
    out = tmp_path / "lj.parquet"
    res = run_valle("phonemize", src, "-o", out, "--tokenizer", "bpe", "--bpe-vocab-size", "300")
    assert res.returncode == 0, _stderr(res)
    df, meta = read_phonemes(out)
    assert df["id"].to_list() == ["LJ001-0001", "LJ001-0002"]
    assert df["text"][1] == "in nineteen eighty-four it was"  # the normalized column
    assert meta["tokenizer"]["type"] == "bpe" and all(isinstance(r, str) for r in meta["tokenizer"]["ranks"])


def test_corpus_folder_ids_match_quantize(espeak_corpus, tmp_path):
    out = tmp_path / "corpus.parquet"
    res = run_valle("phonemize", espeak_corpus, "-o", out)
    assert res.returncode == 0, _stderr(res)
    df, _ = read_phonemes(out)
    audio = find_audio(espeak_corpus)
    audio_ids = sorted(p.relative_to(espeak_corpus).with_suffix("").as_posix() for p in audio)
    assert df["id"].to_list() == audio_ids  # spk00/spk00_0000, ... exactly as quantize names codes
    assert df.height == 12 and all(df["phonemes"].str.len_chars() > 0)


def test_stdin_to_stdout(tmp_path):
    res = run_valle("phonemize", "-", "-o", "-", input=b"The cat sat.\nA dog ran!\n")
    assert res.returncode == 0, _stderr(res)
    table = pq.read_table(io.BytesIO(res.stdout))
    assert table.column("id").to_pylist() == ["stdin-000001", "stdin-000002"]
    assert b"valle" in table.schema.metadata
    res = run_valle("phonemize", "-", "-o", tmp_path / "x.parquet", input=b"")
    assert res.returncode == 1 and "no usable utterances" in _stderr(res)


def test_empty_transcript_fails_with_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "c"
    (folder / "spk").mkdir(parents=True)
    (folder / "spk" / "a.wav").write_bytes(b"")
    (folder / "spk" / "a.txt").write_text("Fine words.")
    (folder / "spk" / "b.wav").write_bytes(b"")
    (folder / "spk" / "b.txt").write_text("  \n")
    out = tmp_path / "c.parquet"
    res = run_valle("phonemize", folder, "-o", out)
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: 1 bad row(s)") and "b.txt [spk/b] empty transcript" in lines[0]
    assert not out.exists() and list(tmp_path.glob(".*tmp*")) == []
    res = run_valle("phonemize", folder, "-o", out, "--skip-bad")
    assert res.returncode == 0 and "left out 1 bad row(s)" in _stderr(res)
    assert read_phonemes(out)[0]["id"].to_list() == ["spk/a"]


def test_vocab_reuse_gives_identical_ids(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("The quick brown fox.\nJumps over the dog.\n")
    second.write_text("Jumps over the dog.\n")
    run_valle("phonemize", first, "-o", tmp_path / "a.parquet")
    res = run_valle("phonemize", second, "-o", tmp_path / "b.parquet", "--vocab", tmp_path / "a.parquet")
    assert res.returncode == 0, _stderr(res)
    a_df, a_meta = read_phonemes(tmp_path / "a.parquet")
    b_df, b_meta = read_phonemes(tmp_path / "b.parquet")
    assert b_meta["tokenizer"] == a_meta["tokenizer"]
    assert b_df["tokens"].to_list()[0] == a_df["tokens"].to_list()[1]


def test_usage_errors_exit_2(tmp_path):
    src = tmp_path / "x.txt"
    src.write_text("hi\n")
    res = run_valle("phonemize", src, "-o", tmp_path / "o.parquet", "--tokenizer", "nope")
    assert res.returncode == 2 and res.stdout == b""
    res = run_valle("phonemize", src, "-o", tmp_path / "o.parquet", "--lang", "xx-nope")
    assert res.returncode == 1 and res.stderr.count(b"\n") == 1 and b"--list-langs" in res.stderr
