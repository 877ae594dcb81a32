"""valle similarity: cosine and EER by hand, the encoders on espeak voices, and the command as a user runs it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import REPO, ok, one_error_line, run_valle, unusable_clips

from valle_cli import formats
from valle_cli.errors import InputError
from valle_cli.evaluation import similarity as sim


def wavs(corpus: Path, speaker: str) -> list[Path]:
    return sorted((corpus / speaker).glob("*.wav"))


def same_and_different(result: sim.Matrix) -> tuple[float, float]:
    return result.same["mean"], result.different["mean"]


# ----------------------------------------------------------------------------- scores by hand


def test_cosine_of_pairs_and_of_a_matrix():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [4.0, -3.0], [1.0, 2.0]])
    assert np.allclose(sim.cosine_pairs(a, b), [1.0, -1.0, 0.0, 0.0])  # a zero vector is like nothing
    m = sim.cosine_matrix(a[:3])
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
    assert np.isclose(m[0, 1], 1 / np.sqrt(2)) and np.isclose(m[0, 2], 0.6)


def test_equal_error_rate_on_hand_made_scores():
    same = [True, True, True, False, False, False]
    assert sim.equal_error_rate([0.9, 0.8, 0.7, 0.3, 0.2, 0.1], same) == 0.0  # separable
    assert sim.equal_error_rate([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], same) == 1.0  # backwards
    assert sim.equal_error_rate([0.5] * 6, same) == 0.5  # scores that tell nothing
    # one different pair (0.7) above one same pair (0.3): at t = 0.7 one of three of each kind is wrong
    assert np.isclose(sim.equal_error_rate([0.9, 0.8, 0.3, 0.7, 0.2, 0.1], same), 1 / 3)
    # a same and a different pair tied at 0.5 are accepted together: (false accepts, false rejects) go
    # from (0, 1/2) to (1/4, 0) in one step, and the line between crosses at 1/6
    scores, labels = [0.9, 0.5, 0.5, 0.1, 0.05, 0.01], [True, True, False, False, False, False]
    assert np.isclose(sim.equal_error_rate(scores, labels), 1 / 6)
    with pytest.raises(ValueError, match="both"):
        sim.equal_error_rate([0.9, 0.8], [True, True])


def test_pairs_tables_folders_and_speakers(tmp_path):
    for name in ("x.wav", "y.wav", "sub/z.wav"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    table = tmp_path / "pairs.txt"
    table.write_text("a,b\nx.wav,y.wav\n\n# a comment\nsub/z.wav , x.wav\n")
    assert sim.read_pairs(table) == [(tmp_path / "x.wav", tmp_path / "y.wav"), (tmp_path / "sub/z.wav",
                                                                                 tmp_path / "x.wav")]
    table.write_text(f"x.wav|{tmp_path / 'y.wav'}\n")  # '|' and an absolute path
    assert sim.read_pairs(table) == [(tmp_path / "x.wav", tmp_path / "y.wav")]
    table.write_text("x.wav\ty.wav\ny.wav\n")
    with pytest.raises(InputError, match="line 2: expected two paths"):
        sim.read_pairs(table)
    table.write_text("x.wav,y.wav\nx.wav,nope.wav\n")
    with pytest.raises(InputError, match="line 2: .*nope.wav: no such file"):
        sim.read_pairs(table)
    a, b = tmp_path / "A", tmp_path / "B"
    for path in (a / "s1/u1.wav", a / "s1/u2.flac", a / "only_a.wav", b / "s1/u1.npz", b / "s1/u2.wav",
                 b / "s2/only_b.wav", b / "notes.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = sim.pair_folders(a, b)
    assert found.pairs == [(a / "s1/u1.wav", b / "s1/u1.npz"), (a / "s1/u2.flac", b / "s1/u2.wav")]
    assert found.only_a == ["only_a"] and found.only_b == ["s2/only_b"]
    assert sim.speakers_of(sim.find_inputs(b), b) == ["s1", "s1", "s2"]
    assert sim.speakers_of(sim.find_inputs(a), a) is None  # only_a.wav sits in no speaker folder


# ----------------------------------------------------------------------------- the encoders on espeak voices


def test_mfcc_scores_the_same_voice_higher(espeak_corpus):
    paths = sim.find_inputs(espeak_corpus)
    result = sim.matrix(paths, "mfcc", speakers=sim.speakers_of(paths, espeak_corpus))
    same, different = same_and_different(result)
    assert result.table.height == 66 and result.same["n"] == 18 and result.different["n"] == 48
    assert same > different + 0.1 and result.eer < 0.25
    # a file against itself is 1, and every file is embedded once however many pairs it is in
    first = paths[0]
    table = sim.similarity_table([(first, first), (first, paths[5])], "mfcc")
    assert table.columns == ["a", "b", "similarity", "encoder"] and table["encoder"].to_list() == ["mfcc"] * 2
    assert np.isclose(table["similarity"][0], 1.0) and np.isclose(table["similarity"][1], result.scores[0, 5])


def test_ge2e_scores_the_same_voice_clearly_higher(espeak_corpus, tmp_path):
    """The real claim, through the command: GE2E tells espeak voices apart (about 0.9 vs 0.7 here)."""
    pytest.importorskip("resemblyzer")
    out = tmp_path / "ge2e.parquet"
    err = ok(run_valle("similarity", "--matrix", espeak_corpus, "-o", out, "--device", "cpu"))
    df, meta = formats.read_parquet(out, "speaker-similarity")
    assert meta["encoder"] == "ge2e" and meta["mode"] == "matrix" and df.height == 66
    same = df.filter(pl.col("same_speaker"))["similarity"].mean()
    different = df.filter(~pl.col("same_speaker"))["similarity"].mean()
    assert same > different + 0.05
    assert np.isclose(meta["same_speaker"]["mean"], same) and np.isclose(meta["different_speaker"]["mean"], different)
    assert meta["eer"] < 0.2
    assert "3 speaker(s): same speaker" in err and "different speakers" in err and "EER" in err


# ----------------------------------------------------------------------------- the command


def test_help_starts_with_the_example():
    res = run_valle("similarity", "--help")
    text = " ".join(res.stdout.decode().split())
    assert res.returncode == 0 and text.startswith("Usage: valle similarity")
    assert text.split("]... ", 1)[1].startswith("Example: valle similarity")
    for flag in ("--pairs", "--matrix", "--encoder", "--checkpoint", "ge2e|mfcc|codes"):
        assert flag in text


def test_one_pair_to_stdout_csv(espeak_corpus):
    a, b = wavs(espeak_corpus, "spk00")[0], wavs(espeak_corpus, "spk01")[0]
    res = run_valle("similarity", a, b, "-e", "mfcc")
    err = ok(res)
    df = pl.read_csv(io.BytesIO(res.stdout))
    assert df.columns == ["a", "b", "similarity", "encoder"] and df.height == 1
    assert df["a"][0] == str(a) and df["b"][0] == str(b) and df["encoder"][0] == "mfcc"
    assert -1.0 <= df["similarity"][0] < 0.99
    assert err == f"1 pair, mfcc similarity {df['similarity'][0]:.3f}"


def test_two_folders_paired_by_name(espeak_corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(espeak_corpus / "spk00", a / "spk00")
    shutil.copytree(espeak_corpus / "spk00", b / "spk00")
    shutil.copy(wavs(espeak_corpus, "spk01")[0], a / "extra.wav")  # in a only: said, not compared
    out = tmp_path / "out.csv"
    err = ok(run_valle("similarity", a, b, "-e", "mfcc", "-o", out))
    df = pl.read_csv(out)
    assert df.height == 4 and df["a"].to_list() == [str(p) for p in wavs(a, "spk00")]
    assert df["b"].to_list() == [str(p) for p in wavs(b, "spk00")]
    assert np.allclose(df["similarity"].to_numpy(), 1.0, atol=1e-5)  # the same files
    assert f"Warning: 1 file(s) of {a} have no counterpart in {b}, not compared: extra" in err
    assert "4 pair(s), mfcc similarity: mean 1.000" in err and f"-> {out}" in err
    before = out.stat().st_mtime_ns
    assert "exists, skipping" in ok(run_valle("similarity", a, b, "-e", "mfcc", "-o", out))
    assert out.stat().st_mtime_ns == before


def test_pairs_table_to_json_and_matrix_to_parquet(espeak_corpus, tmp_path):
    table = tmp_path / "lists" / "pairs.csv"
    table.parent.mkdir()
    rel = [Path("..") / "corpus" / p.relative_to(espeak_corpus) for p in sorted(espeak_corpus.rglob("*.wav"))]
    shutil.copytree(espeak_corpus, tmp_path / "corpus")
    table.write_text("a,b\n" + "".join(f"{rel[0]},{r}\n" for r in rel[1:4]) + f"{rel[0]},{rel[8]}\n")
    out = tmp_path / "pairs.json"
    ok(run_valle("similarity", "--pairs", table, "-e", "mfcc", "-o", out, "-q"))
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and set(rows[0]) == {"a", "b", "similarity", "encoder"}
    assert rows[0]["a"] == str(table.parent / rel[0]) and rows[3]["b"] == str(table.parent / rel[8])
    assert pl.read_json(out).equals(pl.DataFrame(rows))
    same, different = [r["similarity"] for r in rows[:3]], rows[3]["similarity"]  # spk00 x3, then spk02
    assert min(same) > different
    # the matrix of the whole corpus, to parquet: long format, a < b, the summary in the metadata
    out = tmp_path / "matrix.parquet"
    err = ok(run_valle("similarity", "--matrix", espeak_corpus, "-e", "mfcc", "-o", out))
    df, meta = formats.read_parquet(out, "speaker-similarity")
    assert df.columns == ["a", "b", "similarity", "encoder", "same_speaker"] and df.height == 66
    assert (df["a"] < df["b"]).all() and df["same_speaker"].sum() == 18
    pair = df.filter((pl.col("a") == str(espeak_corpus / rel[0].relative_to("../corpus")))
                     & (pl.col("b") == str(espeak_corpus / rel[1].relative_to("../corpus"))))
    assert np.isclose(pair["similarity"][0], rows[0]["similarity"])
    assert meta["summary"]["n"] == 66 and np.isclose(meta["summary"]["mean"], df["similarity"].mean())
    assert meta["same_speaker"]["mean"] > meta["different_speaker"]["mean"] and 0 <= meta["eer"] < 0.25
    assert "12 files, 66 pair(s)" in err and "same speaker" in err and f"EER {100 * meta['eer']:.1f} %" in err


def test_bad_inputs_are_one_line_errors(espeak_corpus, tmp_path):
    good = wavs(espeak_corpus, "spk00")[0]
    assert f"{tmp_path / 'nope.wav'}: no such file" in one_error_line(
        run_valle("similarity", good, tmp_path / "nope.wav", "-e", "mfcc"))
    (tmp_path / "junk.wav").write_text("not audio at all")
    assert "junk.wav: not a readable audio file" in one_error_line(
        run_valle("similarity", good, tmp_path / "junk.wav", "-e", "mfcc"))
    (tmp_path / "empty").mkdir()
    assert "empty: no audio or codes" in one_error_line(run_valle("similarity", "--matrix", tmp_path / "empty"))
    table = tmp_path / "pairs.csv"
    table.write_text(f"{good}|{good}\n{good}|{good}|{good}\n")
    assert "pairs.csv line 2: expected two paths" in one_error_line(run_valle("similarity", "--pairs", table))
    (tmp_path / "other").mkdir()
    shutil.copy(good, tmp_path / "other" / "unrelated.wav")
    assert "has a counterpart" in one_error_line(run_valle("similarity", espeak_corpus / "spk00",
                                                           tmp_path / "other"))
    # usage errors: exit 2
    assert run_valle("similarity", good, good, "-e", "xvector").returncode == 2
    assert run_valle("similarity", good, good, "-e", "codes").returncode == 2  # no --checkpoint
    assert run_valle("similarity", good, good, "-o", tmp_path / "out.txt").returncode == 2
    assert run_valle("similarity", good).returncode == 2
    assert run_valle("similarity", good, good, "--matrix", espeak_corpus).returncode == 2
    assert run_valle("similarity", good, espeak_corpus).returncode == 2  # a file and a folder


@pytest.mark.parametrize("encoder", ["mfcc", "ge2e"])
def test_embed_files_scores_a_clip_of_a_few_frames(espeak_corpus, tmp_path, encoder):
    """evaluate's path: a generated output that stopped after 40 ms gets a (low) score instead of ending the run
    (the tables of valle similarity refuse it: test_bad_inputs)."""
    import soundfile as sf

    good = wavs(espeak_corpus, "spk00")[0]
    audio, rate = sf.read(good, dtype="float32")
    sf.write(tmp_path / "short.wav", audio[: int(0.04 * rate)], rate)
    vectors = sim.embed_files([good, tmp_path / "short.wav"], encoder)
    score = sim.cosine_pairs(vectors[:1], vectors[1:])[0]
    assert np.isfinite(score) and score < 0.95


def test_tables_refuse_unusable_audio_for_one_pair_and_list_it_among_many(espeak_corpus, tmp_path):
    from valle_cli.errors import PartialFailure

    good = wavs(espeak_corpus, "spk00")
    click, silence, antiphase = unusable_clips(good[0], tmp_path)
    with pytest.raises(sim.UnusableAudio, match=r"click.wav: 10 ms of audio, shorter than 50 ms"):
        sim.similarity_table([(good[0], click)], "mfcc")
    for clip in (silence, antiphase):
        with pytest.raises(sim.UnusableAudio, match=f"{clip.name}: digital silence"):
            sim.similarity_table([(good[0], clip)], "mfcc")
    unusable: dict[str, str] = {}
    df = sim.similarity_table([(good[0], good[1]), (good[0], silence), (click, good[1])], "mfcc", unusable=unusable)
    assert df["b"].to_list() == [str(good[1])] and sorted(unusable) == [str(click), str(silence)]
    with pytest.raises(PartialFailure, match=r"2 file\(s\) too short or silent .* \(1 pair\(s\) written\)"):
        sim.write_table(df, tmp_path / "t.csv", {}, unusable)
    assert pl.read_csv(tmp_path / "t.csv")["b"].to_list() == [str(good[1])]  # written before the error
    unusable = {}
    result = sim.matrix([*good[:3], antiphase], "mfcc", speakers=["a", "a", "b", "b"], unusable=unusable)
    assert list(unusable) == [str(antiphase)] and len(result.table) == 3 and result.speakers == ["a", "a", "b"]


def test_ge2e_without_resemblyzer_says_how_to_install(espeak_corpus):
    good = wavs(espeak_corpus, "spk00")[0]
    hide = "import sys; sys.modules['resemblyzer'] = None; from valle_cli.cli import main; main(sys.argv[1:])"
    res = subprocess.run([sys.executable, "-c", hide, "similarity", str(good), str(good)], capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    line = one_error_line(res)
    assert "pip install --no-deps resemblyzer webrtcvad-wheels" in line


# ----------------------------------------------------------------------------- the codes encoder


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    """codes/ quantized from the corpus with a tiny fitted codec, and run/: a tiny model trained on them."""
    return tiny_run


def test_codes_encoder_reads_codes_and_encodes_audio(run, espeak_corpus, tmp_path):
    npz = sorted((run / "codes" / "spk00").glob("*.npz"))
    wav = wavs(espeak_corpus, "spk00")
    table = tmp_path / "pairs.tsv"
    table.write_text(f"{npz[0]}\t{wav[0]}\n{npz[0]}\t{npz[1]}\n{wav[0]}\t{wavs(espeak_corpus, 'spk01')[0]}\n")
    res = run_valle("similarity", "--pairs", table, "-e", "codes", "--checkpoint", run / "run", "--device", "cpu")
    err = ok(res)
    df = pl.read_csv(io.BytesIO(res.stdout))
    assert df["encoder"].to_list() == ["codes"] * 3 and "3 pair(s), codes similarity" in err
    scores = df["similarity"].to_numpy()
    assert np.isclose(scores[0], 1.0, atol=1e-5)  # the audio encodes to the codes quantize made of it
    assert np.isfinite(scores).all() and (np.abs(scores) <= 1 + 1e-6).all()
    # and the library over the codes folder: one vector of model width per file
    vectors = sim.embed_files(npz, "codes", checkpoint=run / "run")
    assert vectors.shape == (4, 64) and np.isfinite(vectors).all()


def test_codes_encoder_rejects_codes_of_another_codec(run, tmp_path):
    other = formats.Codes(codes=np.zeros((2, 10), np.int16), sample_rate=24000, frame_rate=75.0,
                          codec={"name": "encodec", "bandwidth": 1.5})
    formats.write_codes(tmp_path / "other.npz", other)
    mine = sorted((run / "codes" / "spk01").glob("*.npz"))[0]
    line = one_error_line(run_valle("similarity", mine, tmp_path / "other.npz", "-e", "codes",
                                    "--checkpoint", run / "run", "--device", "cpu"))
    assert "other.npz: made by encodec" in line


def test_codes_files_are_decoded_for_audio_encoders(run, espeak_corpus):
    npz = sorted((run / "codes" / "spk00").glob("*.npz"))[0]
    res = run_valle("similarity", npz, wavs(espeak_corpus, "spk00")[0], "-e", "mfcc", "--device", "cpu")
    ok(res)
    assert 0.0 < pl.read_csv(io.BytesIO(res.stdout))["similarity"][0] <= 1.0
