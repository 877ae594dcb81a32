"""Any valid audio loads as mono float32 at the asked rate; bad audio fails naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from valle_cli.codecs.audio import find_audio, load_audio, wav_bytes
from valle_cli.errors import AudioError, InputError


def _tone(rate: int, seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.mark.parametrize("fmt,subtype,ext", [
    ("WAV", "PCM_U8", ".wav"), ("WAV", "PCM_16", ".wav"), ("WAV", "PCM_24", ".wav"),
    ("WAV", "FLOAT", ".wav"), ("FLAC", "PCM_16", ".flac"), ("OGG", "VORBIS", ".ogg"),
    ("MP3", "MPEG_LAYER_III", ".mp3"),
])
def test_formats_and_bit_depths_load(tmp_path, fmt, subtype, ext):
    path = tmp_path / f"a{ext}"
    sf.write(path, _tone(44100), 44100, format=fmt, subtype=subtype)
    wav, seconds = load_audio(path, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(seconds - 0.5) < 0.06  # mp3 adds encoder padding
    assert abs(len(wav) - 8000) < 1000
    assert 0.3 < np.abs(wav).max() <= 1.0


def test_multichannel_is_mixed_and_resampled(tmp_path):
    sf.write(tmp_path / "s.wav", _tone(48000, channels=6), 48000)
    wav, _ = load_audio(tmp_path / "s.wav", 24000)
    assert len(wav) == 12000
    assert np.abs(wav).max() == pytest.approx(0.5, abs=0.02)


def test_float_above_full_scale_is_brought_into_range(tmp_path):
    sf.write(tmp_path / "loud.wav", 3 * _tone(16000), 16000, subtype="FLOAT")
    wav, _ = load_audio(tmp_path / "loud.wav", 16000)
    assert np.abs(wav).max() <= 1.0


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"RIFF\x00\x00garbage" * 10), "not a readable audio file"),
    (lambda p: p.write_text("just some text, not audio"), "not a readable audio file"),
    (lambda p: sf.write(p, np.full(8000, np.nan), 16000, subtype="FLOAT"), "NaN"),
    (lambda p: sf.write(p, _tone(16000, seconds=0.01), 16000), "too short"),
])
def test_bad_audio_fails_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioError, match=message) as info:
        load_audio(path, 16000)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav", 16000)


def test_find_audio_is_recursive_sorted_and_skips_hidden(tmp_path):
    for name in ["b/2.wav", "a/1.flac", "a/.hidden.wav", ".cache/x.wav", "a/notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_audio(tmp_path)] == ["a/1.flac", "b/2.wav"]


def test_wav_bytes_round_trip():
    import io

    data = wav_bytes(_tone(24000).astype(np.float32), 24000)
    back, rate = sf.read(io.BytesIO(data))
    assert rate == 24000 and len(back) == 12000


def test_block_reader_matches_whole_file_read_across_blocks(tmp_path, monkeypatch):
    """6 channels at 44.1 kHz -> mono 24 kHz, read in blocks of 1000 frames (many block joins), equals
    decoding, mixing and resampling the whole file at once."""
    import soxr

    from valle_cli.codecs import audio

    x = np.random.default_rng(0).uniform(-0.4, 0.4, (44100 * 2 + 123, 6)).astype(np.float32)
    sf.write(tmp_path / "six.wav", x, 44100, subtype="FLOAT")
    whole, _ = sf.read(tmp_path / "six.wav", dtype="float32", always_2d=True)
    expected = soxr.resample(whole.mean(axis=1), 44100, 24000, quality="HQ")
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1000)
    blocks = list(audio.MonoStream(tmp_path / "six.wav", 24000))
    assert len(blocks) > 80
    np.testing.assert_allclose(np.concatenate(blocks), expected, rtol=0, atol=1e-6)
    wav, seconds = load_audio(tmp_path / "six.wav", 24000)
    np.testing.assert_allclose(wav, expected, rtol=0, atol=1e-6)
    assert seconds == pytest.approx(len(x) / 44100)


def test_file_over_the_length_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    from valle_cli.codecs import audio

    sf.write(tmp_path / "long.flac", _tone(16000, seconds=3.0), 16000)
    monkeypatch.setenv("VALLE_MAX_AUDIO_HOURS", "0.0005")  # 1.8 s
    monkeypatch.setattr(audio, "_sf_blocks", None)  # decoding anything would fail differently
    with pytest.raises(AudioError) as info:
        load_audio(tmp_path / "long.flac", 16000)
    assert str(info.value) == (f"{tmp_path / 'long.flac'}: 3.0 s of audio, over the limit of 1.8 s per file "
                               "(set VALLE_MAX_AUDIO_HOURS to raise it)")
    monkeypatch.setenv("VALLE_MAX_AUDIO_HOURS", "lots")
    with pytest.raises(InputError, match="VALLE_MAX_AUDIO_HOURS=lots: expected a positive number of hours"):
        load_audio(tmp_path / "long.flac", 16000)


def test_blocks_past_the_limit_are_refused_when_the_header_understates_the_length(tmp_path):
    from valle_cli.codecs import audio

    sf.write(tmp_path / "short.wav", _tone(16000, seconds=0.5), 16000)
    stream = audio.MonoStream(tmp_path / "short.wav", 16000, max_seconds=1.0)
    blocks = (np.zeros((4000, 2), np.float32) for _ in range(5))  # 1.25 s that a header called shorter
    with pytest.raises(AudioError, match="short.wav: 1.2 s of audio, over the limit of 1.0 s per file"):
        list(stream._mono(blocks, 16000))
