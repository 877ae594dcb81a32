"""The built-in offline codec: fitting, the file, encode/decode contracts, errors, and resynthesis."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from valle_cli.codecs import Codec, codec_from_spec, frames_for, load_codec, same_codec
from valle_cli.codecs.builtin import FORMAT_VERSION, BuiltinCodec, BuiltinCodecConfig
from valle_cli.errors import AudioError, CodecError, CodecMismatchError, FormatError

SR = 24000
HOP = 320
TINY = BuiltinCodecConfig(n_codebooks=2, codebook_size=64, kmeans_iters=3, griffin_lim_iters=8)


def synthetic_speechlike(seconds: float, seed: int) -> np.ndarray:
    """Harmonic tones with a wandering pitch, a moving formant-ish envelope, noise and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 60 * rng.random() + 30 * np.sin(2 * np.pi * (0.5 + rng.random()) * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formant = 500 + 1500 * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t + rng.random() * 6))
    wav = sum(np.sin(h * phase) * np.exp(-(((h * f0) - formant) / 800) ** 2) for h in range(1, 30))
    wav = wav + 0.05 * rng.standard_normal(len(t))
    wav *= (np.sin(2 * np.pi * 2.0 * t + rng.random() * 6) > -0.6)  # pauses
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32)


@pytest.fixture(scope="module")
def wavs() -> list[np.ndarray]:
    return [synthetic_speechlike(1.0 + 0.5 * i, seed=i) for i in range(4)]  # 7 s, 525 frames


@pytest.fixture(scope="module")
def codec(wavs: list[np.ndarray]) -> BuiltinCodec:
    return BuiltinCodec.fit(wavs, TINY, seed=0)


# ----------------------------------------------------------------------------- fitting & file


def test_fit_is_deterministic_and_seeded(wavs: list[np.ndarray], codec: BuiltinCodec) -> None:
    again = BuiltinCodec.fit(wavs, TINY, seed=0)
    assert again.to_bytes() == codec.to_bytes()
    assert again.spec == codec.spec
    assert BuiltinCodec.fit(wavs, TINY, seed=1).spec["sha256"] != codec.spec["sha256"]


def test_codec_protocol_and_spec(codec: BuiltinCodec) -> None:
    assert isinstance(codec, Codec)
    assert (codec.sample_rate, codec.frame_rate, codec.n_codebooks, codec.codebook_size) == (SR, 75.0, 2, 64)
    assert codec.spec["name"] == "builtin"
    assert codec.spec["sha256"] == hashlib.sha256(codec.to_bytes()).hexdigest()
    json.dumps(codec.spec)  # recorded in every codes file


def test_progress_reports_every_stage(wavs: list[np.ndarray]) -> None:
    lines: list[str] = []
    BuiltinCodec.fit(wavs, TINY, seed=0, progress=lines.append)
    assert len(lines) == TINY.n_codebooks and "relative error" in lines[0]


def test_save_load_round_trip(tmp_path: Path, codec: BuiltinCodec, wavs: list[np.ndarray]) -> None:
    path = tmp_path / "sub" / "codec.safetensors"
    sha_before = codec.spec["sha256"]
    codec.save(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha_before == codec.spec["sha256"]
    assert codec.spec["path"] == str(path.resolve())
    assert [p.name for p in path.parent.iterdir()] == ["codec.safetensors"]  # no temporary left behind

    loaded = BuiltinCodec.load(path)
    assert loaded.spec == codec.spec and same_codec(loaded.spec, codec.spec)
    assert loaded.config == codec.config
    for a, b in zip(loaded.encode(wavs), codec.encode(wavs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert load_codec(str(path)).spec == codec.spec
    moved = dict(codec.spec, path=str(tmp_path / "gone.safetensors"))
    assert codec_from_spec(moved, search=[path.parent]).spec["sha256"] == sha_before


def test_file_is_plain_safetensors(tmp_path: Path, codec: BuiltinCodec) -> None:
    from safetensors import safe_open

    codec.save(tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) >= {"codebooks", "mean", "std", "mel_basis"}
        assert tuple(f.get_tensor("codebooks").shape) == (2, 64, 80)
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["config"])["codebook_size"] == 64


def test_bad_files(tmp_path: Path, codec: BuiltinCodec) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    codec.save(good)
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "empty.safetensors": b"",
        "random.safetensors": np.random.default_rng(0).bytes(1000),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"), metadata={"x": "y"})
    # same file, but claiming a future format version (header rewritten, same length)
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].replace(b'"format_version":"1"', b'"format_version":"9"')
    (tmp_path / "future.safetensors").write_bytes(data[:8] + header + data[8 + n:])
    for name in [*cases, "foreign.safetensors", "future.safetensors"]:
        with pytest.raises(FormatError, match=name):
            BuiltinCodec.load(tmp_path / name)
    with pytest.raises(CodecError):
        BuiltinCodec.load(tmp_path / "missing.safetensors")


def test_too_little_audio() -> None:
    with pytest.raises(CodecError, match=r"need at least 0\.9 s"):
        BuiltinCodec.fit([synthetic_speechlike(0.5, seed=0)], TINY)
    with pytest.raises(CodecError, match="too little audio"):
        BuiltinCodec.fit([], TINY)


# ----------------------------------------------------------------------------- encode / decode


def test_encode_shapes_and_frame_counts(codec: BuiltinCodec) -> None:
    sizes = [0, 1, HOP - 1, HOP, HOP + 1, SR + 17]
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in sizes]
    for wav, codes in zip(audio, codec.encode(audio), strict=True):
        assert codes.shape == (2, frames_for(len(wav), SR, codec.frame_rate))
        assert codes.dtype == np.int16 and codes.min() >= 0 and codes.max() < 64
    assert codec.encode([]) == []


def test_batch_encode_equals_single(codec: BuiltinCodec, wavs: list[np.ndarray]) -> None:
    batch = codec.encode(wavs)
    for wav, codes in zip(wavs, batch, strict=True):
        np.testing.assert_array_equal(codec.encode([wav])[0], codes)


def test_decode_length_range_and_determinism(codec: BuiltinCodec, wavs: list[np.ndarray]) -> None:
    codes = codec.encode(wavs)
    out = codec.decode(codes)
    for c, wav in zip(codes, out, strict=True):
        assert wav.dtype == np.float32 and wav.shape == (c.shape[1] * HOP,)
        assert np.abs(wav).max() <= 1.0 and np.isfinite(wav).all()
    for a, b in zip(out, codec.decode(codes), strict=True):
        np.testing.assert_array_equal(a, b)
    # an item decodes the same alone as in a batch (up to float rounding)
    np.testing.assert_allclose(codec.decode([codes[1]])[0], out[1], atol=1e-5)
    assert codec.decode([]) == []
    assert codec.decode([np.zeros((2, 0), np.int16)])[0].shape == (0,)


def test_decode_rejects_bad_codes(codec: BuiltinCodec) -> None:
    with pytest.raises(CodecMismatchError):
        codec.decode([np.zeros((3, 10), np.int16)])
    with pytest.raises(FormatError):
        codec.decode([np.full((2, 10), 64, np.int16)])
    with pytest.raises(FormatError):
        codec.decode([np.full((2, 10), -1, np.int16)])
    with pytest.raises(FormatError):
        codec.decode([np.zeros((2, 10), np.float32)])
    with pytest.raises(FormatError):
        codec.decode([np.zeros(10, np.int16)])


@pytest.mark.parametrize("frames", [1, 2, 7, 60])
def test_istft_equals_torch_istft(codec: BuiltinCodec, frames: int) -> None:
    """_istft with scale = 1 / the overlap-added squared window is torch.istft with the codec's settings
    (periodic Hann window of n_fft, hop, center=True), on a spectrogram that no signal has (random phases)."""
    c = codec.config
    gen = torch.Generator().manual_seed(frames)
    n_bins, length = c.n_fft // 2 + 1, frames * c.hop_length
    spec = torch.polar(torch.rand(2, n_bins, frames + 1, generator=gen),
                       torch.rand(2, n_bins, frames + 1, generator=gen) * 2 * torch.pi)  # (B, F, T + 1)
    window2 = codec.window.square()[None, :, None].expand(2, -1, frames + 1)  # (B, n_fft, T + 1)
    scale = 1 / codec._overlap_add(window2, length)  # (B, L)
    ours = codec._istft(spec, scale)
    theirs = torch.istft(spec, c.n_fft, c.hop_length, window=codec.window, center=True, length=length)
    assert ours.shape == theirs.shape == (2, length)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * float(theirs.abs().max()))
    # and it inverts _stft: a signal comes back from its own spectrogram
    audio = torch.randn(2, length, generator=gen)
    torch.testing.assert_close(codec._istft(codec._stft(audio), scale), audio, rtol=0, atol=1e-5)


def test_encode_rejects_bad_audio(codec: BuiltinCodec) -> None:
    with pytest.raises(AudioError):
        codec.encode([np.full(1000, np.nan, np.float32)])
    with pytest.raises(AudioError):
        codec.encode([np.zeros((2, 1000), np.float32)])


# ----------------------------------------------------------------------------- real speech


def _log_mel(wav: np.ndarray) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(y=wav, sr=SR, n_fft=1024, hop_length=256, n_mels=64, fmax=10000)
    return np.log10(np.maximum(mel, 1e-6))


def test_resynthesis_of_real_speech(espeak_corpus: Path) -> None:
    speech = []
    for path in sorted(espeak_corpus.glob("*/*.wav")):
        audio, sr = sf.read(path, dtype="float32")
        speech.append(soxr.resample(audio, sr, SR).astype(np.float32))
    held_out, train = speech[0], speech[1:]
    config = BuiltinCodecConfig(n_codebooks=4, codebook_size=128, kmeans_iters=5, griffin_lim_iters=32)
    codec = BuiltinCodec.fit(train, config, seed=0)
    codes = codec.encode([held_out])[0]
    resynth = codec.decode([codes])[0][: len(held_out)]
    noise_codes = np.random.default_rng(0).integers(0, 128, codes.shape)
    garbage = codec.decode([noise_codes])[0][: len(held_out)]

    ref = _log_mel(held_out)
    good = np.abs(_log_mel(resynth) - ref).mean()
    bad = np.abs(_log_mel(garbage) - ref).mean()
    assert good < 0.5 * bad, (good, bad)
    # loudness is preserved (no normalisation happens anywhere)
    assert 0.5 < np.sqrt(np.mean(resynth**2) / np.mean(held_out**2)) < 2.0
