"""Bad input, one verb at a time: what a careless or hostile user does, and the one-line answer valle gives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_CODEC, one_error_line, run_valle, unusable_clips

# ============================================================================= every verb: an output that is an input
# `valle X a.wav -o a.wav --overwrite` turned the input into the output (quantize the wav into an npz, decode the
# npz into a wav, phonemize the .txt into parquet); without --overwrite it said "exists, skipping" and exited 0
# having done nothing. Each verb refuses, --overwrite or not: one line, exit 1, the input untouched.


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


@pytest.fixture
def work(tiny_run: Path, espeak_corpus: Path, tmp_path: Path) -> SimpleNamespace:
    """Private copies of tiny_run's products (a run that should have been refused may damage them) and the
    files the cases below name."""
    w = SimpleNamespace(corpus=_copy(espeak_corpus / "spk00", tmp_path / "corpus"),
                        codes=_copy(tiny_run / "codes", tmp_path / "codes"),
                        phonemes=_copy(tiny_run / "phonemes.parquet", tmp_path / "phonemes.parquet"),
                        shards=_copy(tiny_run / "shards", tmp_path / "shards"),
                        run=_copy(tiny_run / "run", tmp_path / "run"))
    w.codec = w.codes / "codec.safetensors"
    w.wav = _copy(sorted(w.corpus.glob("*.wav"))[0], tmp_path / "a.wav")
    w.npz = _copy(sorted(w.codes.rglob("*.npz"))[0], tmp_path / "a.npz")
    w.step = sorted((w.run / "checkpoints").iterdir())[-1]
    w.text = tmp_path / "t.txt"
    w.text.write_text("Hello there.\n")
    w.pairs = tmp_path / "pairs.csv"
    w.pairs.write_text(f"{w.wav}|{w.wav}\n")
    w.samples = tmp_path / "samples"
    w.sample = _copy(w.npz, (w.samples / "a.npz", w.samples.mkdir())[0])
    w.rows = tmp_path / "rows.csv"
    w.rows.write_text(f"a|Hello.|{w.npz}\n")
    w.rows_prompting_the_output = tmp_path / "rows2.csv"  # id a -> samples/a.npz, which is also its prompt
    w.rows_prompting_the_output.write_text(f"a|Hello.|{w.sample}\n")
    return w


Case = Callable[[SimpleNamespace], tuple[list[object], Path]]  # work -> (valle arguments, the input to protect)
OUTPUT_IS_INPUT: dict[str, Case] = {
    "quantize a.wav -o a.wav": lambda w: (["quantize", w.wav, "-o", w.wav, "--codec", w.codec], w.wav),
    "quantize a.wav -o x/../a.wav": lambda w: (
        ["quantize", w.wav, "-o", w.wav.parent / "x" / ".." / "a.wav", "--codec", w.codec], w.wav),
    "quantize a.wav --codec C -o C": lambda w: (["quantize", w.wav, "-o", w.codec, "--codec", w.codec], w.codec),
    "quantize --fit-codec a.wav -o a.wav": lambda w: (["quantize", "--fit-codec", w.wav, "-o", w.wav], w.wav),
    "quantize corpus/ -o corpus/": lambda w: (["quantize", w.corpus, "-o", w.corpus, "--codec", w.codec], w.corpus),
    "decode a.npz -o a.npz": lambda w: (["decode", w.npz, "-o", w.npz], w.npz),
    "decode codes/ -o codes/": lambda w: (["decode", w.codes, "-o", w.codes], w.codes),
    "phonemize t.txt -o t.txt": lambda w: (["phonemize", w.text, "-o", w.text], w.text),
    "phonemize --vocab P -o P": lambda w: (["phonemize", w.text, "--vocab", w.phonemes, "-o", w.phonemes],
                                           w.phonemes),
    "score-chunks codes/ -o codes/manifest.parquet": lambda w: (
        ["score-chunks", w.codes, "-o", w.codes / "manifest.parquet"], w.codes / "manifest.parquet"),
    "shard codes/ P -o codes/": lambda w: (["shard", w.codes, w.phonemes, "-o", w.codes], w.codes),
    "sample --prompt a.npz -o a.npz": lambda w: (
        ["sample", w.run, "--text", "Hi.", "--prompt", w.npz, "-o", w.npz, "--device", "cpu"], w.npz),
    "sample --manifest: a row's output is its prompt": lambda w: (
        ["sample", w.run, "--manifest", w.rows_prompting_the_output, "-o", w.samples, "--device", "cpu"], w.sample),
    "similarity --pairs T -o T": lambda w: (["similarity", "--pairs", w.pairs, "-o", w.pairs], w.pairs),
    "evaluate rows samples/ -o samples/": lambda w: (["evaluate", w.rows, w.samples, "-o", w.samples], w.samples),
    "evaluate --references R -o R": lambda w: (
        ["evaluate", w.rows, w.samples, "--references", w.corpus, "-o", w.corpus], w.corpus),
    "train shards/ -o shards/": lambda w: (["train", w.shards, "-o", w.shards, "--device", "cpu"], w.shards),
    "train --init-from run/checkpoints/step-N -o run/": lambda w: (
        ["train", w.shards, "-o", w.run, "--init-from", w.step, "--device", "cpu"], w.run),
    "train --merge-lora run/ -o run/": lambda w: (["train", "--merge-lora", w.run, "-o", w.run], w.run),
}


def _contents(path: Path) -> dict[str, bytes]:
    """Every file at or under ``path`` with its bytes."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): p.read_bytes() for p in files}


@pytest.mark.parametrize("case", OUTPUT_IS_INPUT)
def test_an_output_that_is_an_input_is_refused_in_every_verb(case, work):
    args, protected = OUTPUT_IS_INPUT[case](work)
    before = _contents(protected)
    for overwrite in ([], ["--overwrite"]):
        line = one_error_line(run_valle(*args, *overwrite))
        assert " the input " in line and "valle never replaces an input, even with --overwrite" in line, line
        assert _contents(protected) == before


def test_an_output_that_resolves_to_the_input_says_so(tmp_path):
    (tmp_path / "t.txt").write_text("Hello there.\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "t.txt")
    line = one_error_line(run_valle("phonemize", tmp_path / "t.txt", "-o", tmp_path / "link.txt", "--overwrite"))
    assert line == (f"Error: -o {tmp_path / 'link.txt'} resolves to the input {tmp_path / 't.txt'}: write the "
                    "output elsewhere (valle never replaces an input, even with --overwrite)")
    assert (tmp_path / "t.txt").read_text() == "Hello there.\n"


# ============================================================================= phonemize


def test_phonemize_a_corpus_with_one_non_utf8_transcript_lists_it_as_a_bad_row(espeak_corpus, tmp_path):
    """It aborted the whole folder, even with --skip-bad; now it is a bad row like an empty transcript."""
    import polars as pl

    corpus = _copy(espeak_corpus / "spk00", tmp_path / "corpus")
    bad = sorted(corpus.glob("*.txt"))[1]
    bad.write_bytes("Caf\u00e9 au lait.\n".encode("latin-1"))
    line = one_error_line(run_valle("phonemize", corpus, "-o", tmp_path / "p.parquet"))
    assert line.startswith("Error: 1 bad row(s): ") and f"{bad}:1 [{bad.stem}] not UTF-8 text (byte 0xe9" in line
    assert line.endswith("(fix them, or pass --skip-bad to leave them out)")
    assert not (tmp_path / "p.parquet").exists()
    res = run_valle("phonemize", corpus, "-o", tmp_path / "p.parquet", "--skip-bad")
    err = " ".join(res.stderr.decode().split())
    assert res.returncode == 0 and f"left out 1 bad row(s): {bad}:1 [{bad.stem}] not UTF-8 text" in err, err
    ids = pl.read_parquet(tmp_path / "p.parquet")["id"].to_list()
    assert len(ids) == len(list(corpus.glob("*.txt"))) - 1 and bad.stem not in ids


def test_phonemize_garbage_on_stdin_names_stdin():
    line = one_error_line(run_valle("phonemize", "-", "-o", "-", input=b"\xff\xfe\x00garbage"))
    assert line == "Error: <stdin>:1: not UTF-8 text (byte 0xff at offset 0)"


# ============================================================================= quantize


@pytest.fixture(scope="module")
def codec_file(espeak_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    codec = tmp_path_factory.mktemp("codec") / "codec.safetensors"
    assert run_valle("quantize", "--fit-codec", espeak_corpus / "spk00", "-o", codec, *TINY_CODEC).returncode == 0
    return codec


@pytest.mark.parametrize("data, said", [(b"", "Error: <stdin>: empty input (0 bytes)"),
                                        (b"\x00garbage" * 40, "Error: <stdin>: not a readable audio file (")])
def test_quantize_empty_or_garbage_stdin_names_stdin_not_a_python_object(codec_file, data, said):
    """libsndfile's message named the stream '<_io.BytesIO object at 0x7f...>'."""
    line = one_error_line(run_valle("quantize", "-", "-o", "-", "--codec", codec_file, input=data))
    assert line.startswith(said) and "_io" not in line and "0x" not in line, line


# ============================================================================= decode


def test_decode_of_audio_says_it_is_not_codes_and_never_mentions_pickle(espeak_corpus, tmp_path):
    """numpy read a non-zip file as a pickle and said 'If you trust the file ... allow_pickle=': an unsafe hint."""
    wav = sorted(espeak_corpus.rglob("*.wav"))[0]
    line = one_error_line(run_valle("decode", wav, "-o", tmp_path / "x.wav"))
    assert line == f"Error: {wav}: not a codes .npz file but audio (valle quantize turns audio into codes)"
    line = one_error_line(run_valle("decode", "-", "-o", tmp_path / "x.wav", input=b"\x00garbage" * 40))
    assert line == "Error: <stdin>: not a codes .npz file (made by valle quantize or valle sample)"
    np.savez(tmp_path / "objects.npz", codes=np.array([{"a": 1}], dtype=object))  # a zip, with a pickled array
    line = one_error_line(run_valle("decode", tmp_path / "objects.npz", "-o", tmp_path / "x.wav"))
    assert line == f"Error: {tmp_path / 'objects.npz'}: not a valle codes file (it holds pickled Python objects)"
    assert not (tmp_path / "x.wav").exists()


# ============================================================================= more cases, stage by stage


def test_quantize_audio_longer_than_the_limit_is_one_line(tmp_path):
    """A file longer than the per-file limit (a small FLAC can hold hours of silence) is refused before
    it is decoded, naming the file, its length, the limit and the setting that raises it."""
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 3), 16000)
    codec = tmp_path / "codec.safetensors"
    assert run_valle("quantize", "--fit-codec", tmp_path / "a.wav", "-o", codec, *TINY_CODEC).returncode == 0
    res = run_valle("quantize", tmp_path / "a.wav", "-o", tmp_path / "a.npz", "--codec", codec,
                    env={"VALLE_MAX_AUDIO_HOURS": "0.0005"})
    assert one_error_line(res) == (f"Error: {tmp_path / 'a.wav'}: 3.0 s of audio, over the limit of 1.8 s per "
                                   "file (set VALLE_MAX_AUDIO_HOURS to raise it)")
    assert not (tmp_path / "a.npz").exists()


# ----------------------------------------------------------------------------- sample, decode, similarity


def test_sample_manifest_ids_cannot_leave_the_output_folder(tiny_run, espeak_corpus, tmp_path):
    """An id '../../escaped' or an absolute id would write (with --overwrite: replace) an npz outside -o."""
    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    out = tmp_path / "a" / "b" / "out"
    for bad in ("../../escaped", str(tmp_path / "absolute")):
        (tmp_path / "rows.csv").write_text(f"fine|Good morning.|{prompt}\n{bad}|Hello.|{prompt}\n")
        line = one_error_line(run_valle("sample", tiny_run / "run", "--manifest", tmp_path / "rows.csv", "-o", out,
                                        "--max-seconds", "0.1", "--overwrite", "--device", "cpu"))
        assert f"rows.csv: 1 id(s) would write outside the output folder ({bad!r})" in line
    assert list(tmp_path.rglob("*.npz")) == []


def test_sample_past_the_model_context_is_one_line_naming_the_limit(tiny_run, espeak_corpus, tmp_path):
    """nar-len --duration 600 on a 2048-position model ended in 'IndexError: index 2048 is out of bounds'."""
    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    common = ("sample", tiny_run / "run", "--prompt", prompt, "-o", tmp_path / "x.npz", "--device", "cpu")
    line = one_error_line(run_valle(*common, "--text", "Hello.", "--mode", "nar-len", "--duration", "600"))
    assert "--duration 600: 600.00 s" in line and "past the model's context of 2048 positions (room for" in line
    line = one_error_line(run_valle(*common, "--continue-seconds", "600"))
    assert "--continue-seconds 600" in line and "2048 positions" in line
    assert not (tmp_path / "x.npz").exists()


def test_decode_of_codes_without_frames_is_refused(tiny_run, tmp_path):
    """T = 0 codes used to give a 44-byte wav and exit 0."""
    from valle_cli import formats

    item = formats.read_codes(sorted((tiny_run / "codes" / "spk00").glob("*.npz"))[0])
    item.codes = item.codes[:, :0]
    (tmp_path / "in").mkdir()
    formats.write_codes(tmp_path / "in" / "empty.npz", item)
    line = one_error_line(run_valle("decode", tmp_path / "in" / "empty.npz", "-o", tmp_path / "empty.wav"))
    assert line == f"Error: {tmp_path / 'in' / 'empty.npz'}: no code frames (T = 0): nothing to decode"
    assert not (tmp_path / "empty.wav").exists()
    res = run_valle("decode", tmp_path / "in", "-o", tmp_path / "out")  # a folder: listed, exit 1
    assert res.returncode == 1 and "empty.npz: no code frames" in res.stderr.decode()
    assert not (tmp_path / "out" / "empty.wav").exists()


def test_similarity_refuses_clicks_silence_and_anti_phase_stereo(espeak_corpus, tmp_path):
    """They scored 0.000 and 0.431 (ge2e) with exit 0; quantize already refuses clips under 50 ms."""
    import polars as pl

    good = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    click, silence, antiphase = unusable_clips(good, tmp_path / "b")
    assert "click.wav: 10 ms of audio, shorter than 50 ms" in one_error_line(
        run_valle("similarity", good, click, "-e", "mfcc"))
    for clip in (silence, antiphase):
        assert f"{clip}: digital silence" in one_error_line(run_valle("similarity", good, clip, "-e", "mfcc"))
    (tmp_path / "a").mkdir()
    for name in ("click", "silence", "antiphase", "fine"):
        (tmp_path / "a" / f"{name}.wav").symlink_to(good)
    (tmp_path / "b" / "fine.wav").symlink_to(good)
    res = run_valle("similarity", tmp_path / "a", tmp_path / "b", "-e", "mfcc", "-o", tmp_path / "t.csv")
    err = res.stderr.decode()
    assert res.returncode == 1 and all(f"{p}: " in err for p in (click, silence, antiphase)), err
    assert "Error: 3 file(s) too short or silent to compare, left out (1 pair(s) written)" in err
    assert pl.read_csv(tmp_path / "t.csv")["b"].to_list() == [str(tmp_path / "b" / "fine.wav")]
    res = run_valle("similarity", "--matrix", tmp_path / "b", "-e", "mfcc", "-o", tmp_path / "m.csv")
    assert res.returncode == 1 and "fewer than 2 files left" in res.stderr.decode()


def test_similarity_of_stdin_says_stdin_is_not_read(espeak_corpus):
    good = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    line = one_error_line(run_valle("similarity", "-", good, "-e", "mfcc"))
    assert line == "Error: -: similarity compares files, not stdin (a table of pairs can come from stdin: --pairs -)"


# ============================================================================= train and shard: broken inputs
# A checkpoint of another format version was resumed and trained on; a broken train state ended in `KeyError:
# 'optimizer'` or `SafetensorError: ... header too large`, naming no file; an index.parquet that disagrees with its
# .bin, or a code out of range, trained or ended in `IndexError: index out of range in self` with a run folder of
# only config.json left behind; shard packed an npz of another codec (same K, another sha256) without a word.

TRAIN_2_STEPS = ["--preset", "tiny", "--max-steps", "2", "--batch-tokens", "3000", "--device", "cpu",
                 "--set", "prompt_seconds=[0.5,1.0]"]


@pytest.mark.parametrize("how", ["--resume", "--init-from"])
def test_train_refuses_a_checkpoint_of_another_format_version_before_reading_it(how, tiny_run, tmp_path):
    import json

    run = _copy(tiny_run / "run", tmp_path / "run")
    step = sorted((run / "checkpoints").iterdir())[-1]
    meta = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({**meta, "format_version": 2}))
    (step / "train_state" / "state.json").write_text("{}")  # never read: the version comes first
    before = _contents(run)
    args = ["-o", run, "--resume", "--max-steps", "8"] if how == "--resume" else \
        ["-o", tmp_path / "new", "--init-from", step, *TRAIN_2_STEPS]
    line = one_error_line(run_valle("train", tiny_run / "shards", *args, "--device", "cpu"))
    assert line == f"Error: {step}: checkpoint format version 2 is not supported (this valle reads version 1)"
    assert _contents(run) == before and not (tmp_path / "new").exists()


def _edit_state(state: Path, change: Callable[[dict], dict]) -> None:
    import json

    path = state / "state.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


BROKEN_TRAIN_STATE: dict[str, tuple[Callable[[Path], object], str]] = {  # train_state/ -> break it, what is said
    "state.json without 'optimizer'": (
        lambda state: _edit_state(state, lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
        "state.json: not a complete train state (no 'optimizer')"),
    "state.json not JSON": (lambda state: (state / "state.json").write_text("{not json"), "state.json: not valid JSON"),
    "optimizer.safetensors garbage": (lambda state: (state / "optimizer.safetensors").write_bytes(b"\xff" * 64),
                                      "optimizer.safetensors: unreadable optimizer state (Error while deserializing "
                                      "header: header too large)"),
    "model.safetensors garbage": (lambda state: (state.parent / "model.safetensors").write_bytes(b"\xff" * 64),
                                  "model.safetensors: unreadable weights (Error while deserializing header: header "
                                  "too large)"),
    "a sampler state of other data": (
        lambda state: _edit_state(state, lambda s: {**s, "sampler": [{"kind": "PriorityWindowSampler"}]}),
        "train_state: cannot resume from this train state (ValueError: "),
}


@pytest.mark.parametrize("case", BROKEN_TRAIN_STATE)
def test_train_resume_from_a_broken_checkpoint_names_the_file_and_the_problem(case, tiny_run, tmp_path):
    break_it, said = BROKEN_TRAIN_STATE[case]
    run = _copy(tiny_run / "run", tmp_path / "run")
    step = sorted((run / "checkpoints").iterdir())[-1]
    break_it(step / "train_state")
    line = one_error_line(run_valle("train", tiny_run / "shards", "-o", run, "--resume", "--max-steps", "8",
                                    "--device", "cpu"))
    assert line.startswith(f"Error: {step}") and said in line, line


def _first_record(shards: Path) -> tuple[dict, int, int]:
    """(index row 0, byte position of its first text token and of its first code in shard 0)."""
    import polars as pl

    from valle_cli import formats

    row = pl.read_parquet(shards / "index.parquet").row(0, named=True)
    header = formats.read_shard_header(shards / "shard-000000.bin")
    text = header.header_bytes + 2 * row["offset"]
    return row, text, text + 2 * row["text_len"]


def test_train_refuses_an_index_that_disagrees_with_its_shard_and_leaves_no_run_folder(tiny_run, tmp_path):
    import polars as pl

    from valle_cli import formats

    shards = _copy(tiny_run / "shards", tmp_path / "shards")
    index, meta = formats.read_shard_index(shards)
    first = pl.int_range(pl.len()) == 0
    formats.write_shard_index(shards, index.with_columns(  # row 0 one value later: it overlaps row 1
        offset=pl.when(first).then(pl.col("offset") + 1).otherwise(pl.col("offset"))), meta)
    line = one_error_line(run_valle("train", shards, "-o", tmp_path / "run", *TRAIN_2_STEPS))
    row = _first_record(shards)[0]
    assert line == (f"Error: {shards / 'shard-000000.bin'}: index.parquet row 0 (id {row['id']!r}) starts at value 1, "
                    "where the record before it ends at 0 (leaves a gap before it)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["code", "text token"])
def test_train_refuses_a_value_out_of_range_naming_the_shard_and_the_record(where, tiny_run, tmp_path):
    shards = _copy(tiny_run / "shards", tmp_path / "shards")
    row, text_at, codes_at = _first_record(shards)
    with open(shards / "shard-000000.bin", "r+b") as f:
        f.seek(codes_at if where == "code" else text_at)
        f.write((60000).to_bytes(2, "little"))
    line = one_error_line(run_valle("train", shards, "-o", tmp_path / "run", *TRAIN_2_STEPS))
    assert line.startswith(f"Error: {shards / 'shard-000000.bin'}: row 0 (id {row['id']!r}) has {where} 60000, "
                           "outside [0, "), line
    assert not (tmp_path / "run").exists()


def test_shard_refuses_codes_of_another_codec_with_the_same_k(tiny_run, tmp_path):
    from dataclasses import replace

    from valle_cli import formats

    codes = _copy(tiny_run / "codes", tmp_path / "codes")
    foreign = sorted(codes.rglob("*.npz"))[0]
    item = formats.read_codes(foreign)
    formats.write_codes(foreign, replace(item, codec={**item.codec, "sha256": "0" * 64}))
    line = one_error_line(run_valle("shard", codes, tiny_run / "phonemes.parquet", "-o", tmp_path / "shards", "-q"))
    said = f"Error: {foreign}: made by builtin codec 000000000000, but this step uses builtin codec "
    assert line.startswith(said), line
    assert not (tmp_path / "shards" / "index.parquet").exists()
