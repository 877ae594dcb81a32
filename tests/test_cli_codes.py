"""quantize and decode through the real command, with the built-in codec on espeak speech."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import soundfile as sf
from conftest import one_error_line, run_valle

from valle_cli import formats

TINY = ["--codebooks", "2", "--codebook-size", "32", "--fit-seconds", "20", "-q"]


@pytest.fixture(scope="module")
def fitted(espeak_corpus, tmp_path_factory):
    """A tiny codec file and the corpus quantized with it."""
    work = tmp_path_factory.mktemp("codes")
    res = run_valle("quantize", "--fit-codec", espeak_corpus, "-o", work / "codec.safetensors", *TINY)
    assert res.returncode == 0, res.stderr.decode()
    res = run_valle("quantize", espeak_corpus, "-o", work / "codes", "--codec", work / "codec.safetensors",
                    "--batch-seconds", "8")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == b""
    return work


def test_folder_quantize_writes_codes_and_manifest(fitted, espeak_corpus):
    wavs = sorted(p.relative_to(espeak_corpus).with_suffix("") for p in espeak_corpus.rglob("*.wav"))
    npzs = sorted(p.relative_to(fitted / "codes").with_suffix("") for p in (fitted / "codes").rglob("*.npz"))
    assert wavs == npzs
    manifest = formats.read_manifest(fitted / "codes")
    assert len(manifest) == len(wavs)
    item = formats.read_codes(fitted / "codes" / f"{wavs[0]}.npz")
    assert item.codes.shape[0] == 2 and item.codec["name"] == "builtin"
    assert item.frame_rate == 75.0 and item.sample_rate == 24000


def test_rerun_skips_finished_files(fitted, espeak_corpus):
    res = run_valle("quantize", espeak_corpus, "-o", fitted / "codes", "--codec", fitted / "codec.safetensors")
    assert res.returncode == 0
    assert b"0 quantized, 12 already done" in res.stderr


def test_bare_command_fits_a_codec_beside_the_codes(espeak_corpus, tmp_path):
    res = run_valle("quantize", espeak_corpus / "spk00", "-o", tmp_path / "codes", *TINY, "--seed", "3")
    assert res.returncode == 0, res.stderr.decode()
    assert (tmp_path / "codes" / "codec.safetensors").is_file()
    item = formats.read_codes(next((tmp_path / "codes").glob("*.npz")))
    assert item.codec["path"] == str((tmp_path / "codes" / "codec.safetensors").resolve())


def test_single_file_and_stdin_stdout_agree_with_folder(fitted, espeak_corpus):
    wav = next(espeak_corpus.rglob("*.wav"))
    rel = wav.relative_to(espeak_corpus).with_suffix(".npz")
    res = run_valle("quantize", "-", "-o", "-", "--codec", fitted / "codec.safetensors", "-q",
                    input=wav.read_bytes())
    assert res.returncode == 0, res.stderr.decode()
    piped = formats.codes_from_bytes(res.stdout)
    assert np.array_equal(piped.codes, formats.read_codes(fitted / "codes" / rel).codes)


def test_library_and_cli_give_the_same_codes(fitted, espeak_corpus):
    from valle_cli.codecs import load_codec
    from valle_cli.codecs.quantize import quantize_file

    wav = next(espeak_corpus.rglob("*.wav"))
    lib = quantize_file(wav, load_codec(str(fitted / "codec.safetensors")))
    cli = formats.read_codes(fitted / "codes" / wav.relative_to(espeak_corpus).with_suffix(".npz"))
    assert np.array_equal(lib.codes, cli.codes) and lib.codec == cli.codec


def test_decode_folder_file_and_pipe(fitted, tmp_path):
    res = run_valle("decode", fitted / "codes", "-o", tmp_path / "wav")
    assert res.returncode == 0 and res.stdout == b""
    npz = next((fitted / "codes").rglob("*.npz"))
    out = tmp_path / "wav" / npz.relative_to(fitted / "codes").with_suffix(".wav")
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == formats.read_codes(npz).n_frames * 320
    piped = run_valle("decode", "-", "-o", "-", input=npz.read_bytes())
    assert piped.returncode == 0 and piped.stdout[:4] == b"RIFF"
    again, _ = sf.read(io.BytesIO(piped.stdout))
    assert np.allclose(again, audio, atol=1e-4)  # decoding is deterministic


def test_decode_finds_the_codec_beside_moved_codes(fitted, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(fitted / "codes", moved / "codes")
    shutil.copy(fitted / "codec.safetensors", moved / "codes" / "codec.safetensors")
    item = formats.read_codes(next((moved / "codes").rglob("*.npz")))
    item.codec["path"] = "/nowhere/codec.safetensors"  # as if made on another machine
    formats.write_codes(moved / "codes" / "x.npz", item)
    res = run_valle("decode", moved / "codes" / "x.npz", "-o", tmp_path / "x.wav")
    assert res.returncode == 0, res.stderr.decode()


def test_decode_bad_inputs(fitted, tmp_path):
    npz = next((fitted / "codes").rglob("*.npz"))
    data = npz.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 3])
    res = run_valle("decode", tmp_path / "cut.npz", "-o", tmp_path / "cut.wav")
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "cut.npz" in lines[0]
    assert not (tmp_path / "cut.wav").exists()
    # codes from one codec, decoded with another
    other = tmp_path / "other.safetensors"
    assert run_valle("quantize", "--fit-codec", fitted.parent, "-o", other, *TINY, "--seed", "7").returncode == 0
    res = run_valle("decode", npz, "-o", tmp_path / "x.wav", "--codec", other)
    assert res.returncode == 1 and b"made by builtin codec" in res.stderr
    assert not (tmp_path / "x.wav").exists()


def test_bad_files_listed_rest_quantized(fitted, espeak_corpus, tmp_path):
    src = tmp_path / "audio"
    shutil.copytree(espeak_corpus / "spk01", src)
    (src / "zero.wav").write_bytes(b"")
    (src / "junk.wav").write_text("not audio at all")
    sf.write(src / "click.wav", np.zeros(220), 22050)
    res = run_valle("quantize", src, "-o", tmp_path / "codes", "--codec", fitted / "codec.safetensors", "-q")
    err = res.stderr.decode()
    assert res.returncode == 1
    assert "zero.wav" in err and "junk.wav" in err and "click.wav" in err
    assert err.strip().splitlines()[-1].startswith("Error: 3 file(s) could not be quantized")
    assert len(list((tmp_path / "codes").glob("*.npz"))) == 4


def test_pretrained_codec_offline_is_one_line_pointing_to_builtin(espeak_corpus, tmp_path):
    res = run_valle("quantize", espeak_corpus, "-o", tmp_path / "codes", "--codec", "encodec:6",
                    env={"HF_HUB_OFFLINE": "1"})
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, lines
    assert "EnCodec" in lines[0] and "built-in codec" in lines[0]
    assert not (tmp_path / "codes").exists()
    res = run_valle("quantize", espeak_corpus, "-o", tmp_path / "codes", "--codec", "dac:8khz")
    assert res.returncode == 1 and b"44khz" in res.stderr


def test_fit_codec_at_a_lower_frame_rate(espeak_corpus, tmp_path):
    """--frame-rate 37.5: a hop of 640 samples, half the frames of the default for the same audio."""
    codec = tmp_path / "codec.safetensors"
    assert run_valle("quantize", "--fit-codec", espeak_corpus / "spk00", "-o", codec, *TINY,
                     "--frame-rate", "37.5").returncode == 0
    wav = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    res = run_valle("quantize", wav, "-o", "-", "--codec", codec)
    item = formats.codes_from_bytes(res.stdout)
    assert item.frame_rate == 37.5
    assert item.codes.shape[1] == -(-round(sf.info(wav).duration * 24000) // 640)
    res = run_valle("decode", "-", "-o", tmp_path / "back.wav", input=res.stdout)
    assert res.returncode == 0 and abs(sf.info(tmp_path / "back.wav").duration - item.seconds) < 0.03
    line = one_error_line(run_valle("quantize", "--fit-codec", espeak_corpus / "spk00", "-o", tmp_path / "c2",
                                    *TINY, "--frame-rate", "33"))
    assert "--frame-rate 33: the built-in codec needs 24000 / frame rate to be a whole number" in line
