"""EnCodec / DAC through transformers (valle_cli.codecs.hf) on seeded random weights, no downloads;
plus the optional original-package backends (valle_cli.codecs.original), skipped where they don't import."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from valle_cli.codecs import Codec, codec_from_spec, frames_for, hf, load_codec, same_codec
from valle_cli.codecs import original as orig
from valle_cli.codecs.hf import DAC_MODELS, ENCODEC_BANDWIDTHS, DacCodec, EncodecCodec
from valle_cli.errors import AudioError, CodecError, CodecMismatchError, FormatError


def tone(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """A gliding tone with a little noise: mono float32 (S,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f = 150 + 100 * seed + 300 * t
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def encodec() -> EncodecCodec:
    return EncodecCodec.random(6.0, seed=0)


_DAC: dict[str, DacCodec] = {}


def dac(model: str) -> DacCodec:
    """One random DAC per model for the whole module (building 44khz takes ~1 s)."""
    if model not in _DAC:
        _DAC[model] = DacCodec.random(model, seed=0)
    return _DAC[model]


# ------------------------------------------------------------------------------------------------
# Shapes, frame counts, types


@pytest.mark.parametrize("bandwidth", list(ENCODEC_BANDWIDTHS))
def test_encodec_shapes_per_bandwidth(encodec: EncodecCodec, bandwidth: float) -> None:
    codec = encodec.at_bandwidth(bandwidth)
    assert isinstance(codec, Codec)
    assert (codec.sample_rate, codec.frame_rate, codec.codebook_size) == (24000, 75.0, 1024)
    assert codec.n_codebooks == ENCODEC_BANDWIDTHS[bandwidth] == int(bandwidth * 4 / 3)
    assert codec.spec == {
        "name": "encodec",
        "model": "facebook/encodec_24khz",
        "bandwidth": bandwidth,
        "random_seed": 0,
        "backend": "transformers",
    }
    wavs = [tone(1.0, 24000), tone(0.3, 24000, seed=1)[:7001]]
    codes = codec.encode(wavs)
    assert [c.shape for c in codes] == [(codec.n_codebooks, 75), (codec.n_codebooks, 22)]
    for c, w in zip(codes, wavs, strict=True):
        assert c.shape[1] == frames_for(len(w), 24000, codec.frame_rate)
        assert c.dtype == np.int64 and c.min() >= 0 and c.max() < 1024


def test_encodec_6kbps_one_second_is_8_by_75(encodec: EncodecCodec) -> None:
    (codes,) = encodec.encode([tone(1.0, 24000)])
    assert codes.shape == (8, 75)
    assert len(np.unique(codes[0])) > 5, "random codebooks are data-initialised, so codes vary"


@pytest.mark.parametrize("model", ["44khz", "16khz"])
def test_dac_shapes(model: str) -> None:
    codec = dac(model)
    variant = DAC_MODELS[model]
    assert isinstance(codec, Codec)
    assert codec.sample_rate == variant.sample_rate and codec.n_codebooks == variant.n_codebooks
    assert codec.frame_rate == pytest.approx(variant.sample_rate / variant.hop_length)
    assert codec.spec == {"name": "dac", "model": model, "random_seed": 0, "backend": "transformers"}
    sr = codec.sample_rate
    wavs = [tone(0.2, sr), tone(0.05, sr, seed=1)]
    codes = codec.encode(wavs)
    for c, w in zip(codes, wavs, strict=True):
        assert c.shape == (variant.n_codebooks, frames_for(len(w), sr, codec.frame_rate))
        assert c.dtype == np.int64 and c.min() >= 0 and c.max() < 1024
    audio = codec.decode(codes)
    assert [a.shape for a in audio] == [(c.shape[1] * variant.hop_length,) for c in codes]
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in audio)


def test_dac_44khz_frame_count() -> None:
    """hop 512 at 44.1 kHz: T = ceil(S / 512), so one second (86.13 hops) gives 87 frames."""
    codec = dac("44khz")
    assert frames_for(44100, 44100, codec.frame_rate) == 87
    codes = codec.encode([tone(10 * 512 / 44100, 44100), np.zeros(10 * 512 + 1, np.float32)])
    assert [c.shape for c in codes] == [(9, 10), (9, 11)]


def test_dac_24khz_shapes() -> None:
    codec = DacCodec.random("24khz")
    assert (codec.sample_rate, codec.n_codebooks, codec.frame_rate) == (24000, 32, 75.0)
    codes = codec.encode([tone(0.1, 24000)])
    assert codes[0].shape == (32, 8)
    assert codec.decode(codes)[0].shape == (8 * 320,)  # zero-filled where DacModel returns 8 fewer


@pytest.mark.gpu
def test_cuda_device_is_honoured() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = EncodecCodec.random(6.0)
    gpu = EncodecCodec.random(6.0, device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    wav = [tone(1.0, 24000)]
    same = (cpu.encode(wav)[0] == gpu.encode(wav)[0]).mean()
    assert same > 0.9  # nearest-codeword ties may flip with GPU arithmetic
    assert gpu.decode(cpu.encode(wav))[0].shape == (24000,)


def test_encodec_decode_lengths_and_types(encodec: EncodecCodec) -> None:
    codes = encodec.encode([tone(0.5, 24000), tone(0.21, 24000, seed=2)])
    audio = encodec.decode(codes)
    assert [a.shape for a in audio] == [(c.shape[1] * 320,) for c in codes] == [(38 * 320,), (16 * 320,)]
    assert all(a.dtype == np.float32 and a.ndim == 1 and np.isfinite(a).all() for a in audio)
    assert encodec.encode([]) == [] and encodec.decode([]) == []


# ------------------------------------------------------------------------------------------------
# Batching


def test_encodec_batch_equals_single_for_equal_lengths(encodec: EncodecCodec) -> None:
    wavs = [tone(0.4, 24000, seed=s) for s in range(3)]
    batch = encodec.encode(wavs)
    for w, b in zip(wavs, batch, strict=True):
        np.testing.assert_array_equal(encodec.encode([w])[0], b)
    assert not np.array_equal(batch[0], batch[1])


def test_encodec_unequal_lengths_keep_causal_prefix(encodec: EncodecCodec) -> None:
    """EnCodec is causal: zero padding after a shorter item can only change its last frame."""
    wavs = [tone(0.5, 24000), tone(0.29, 24000, seed=1)]
    batch = encodec.encode(wavs)
    single = encodec.encode([wavs[1]])[0]
    assert batch[1].shape == single.shape
    np.testing.assert_array_equal(batch[1][:, :-1], single[:, :-1])


def test_dac_batch_equals_single_for_equal_lengths() -> None:
    codec = dac("16khz")
    wavs = [tone(0.1, 16000, seed=s) for s in range(2)]
    batch = codec.encode(wavs)
    for w, b in zip(wavs, batch, strict=True):
        np.testing.assert_array_equal(codec.encode([w])[0], b)


def test_small_batch_budget_gives_same_results(
    encodec: EncodecCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    wavs = [tone(0.2, 24000, seed=s) for s in range(3)]
    whole = encodec.encode(wavs)
    audio = encodec.decode(whole)
    monkeypatch.setattr(encodec, "max_batch_seconds", 0.25)  # one item per forward
    for a, b in zip(whole, encodec.encode(wavs), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(audio, encodec.decode(whole), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_batches_are_bounded_and_cover_every_item(
    encodec: EncodecCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encodec, "max_batch_seconds", 1.0)
    monkeypatch.setattr(encodec, "max_batch_items", 3)
    lengths = [24000, 100, 6000, 6000, 6000, 6000, 12000, 50]
    batches = list(encodec._batches(lengths))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or (len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 24000)


# ------------------------------------------------------------------------------------------------
# Validation and errors


def test_decode_rejects_wrong_codebook_count(encodec: EncodecCodec) -> None:
    with pytest.raises(CodecMismatchError, match="4 codebooks.*uses 8"):
        encodec.decode([np.zeros((4, 10), dtype=np.int64)])
    with pytest.raises(CodecMismatchError):
        dac("44khz").decode([np.zeros((8, 3), dtype=np.int64)])


@pytest.mark.parametrize(
    "codes",
    [
        np.full((8, 5), 1024, dtype=np.int64),
        np.full((8, 5), -1, dtype=np.int64),
        np.zeros((8, 5), dtype=np.float32),
        np.zeros((8,), dtype=np.int64),
        np.zeros((8, 0), dtype=np.int64),
    ],
    ids=["too-big", "negative", "float", "1-d", "no-frames"],
)
def test_decode_rejects_bad_codes(encodec: EncodecCodec, codes: np.ndarray) -> None:
    with pytest.raises(FormatError):
        encodec.decode([np.zeros((8, 3), dtype=np.int64), codes])


@pytest.mark.parametrize(
    "wav",
    [np.zeros(0, np.float32), np.zeros((2, 100), np.float32), np.array([0.0, np.nan], np.float32)],
    ids=["empty", "stereo", "nan"],
)
def test_encode_rejects_bad_audio(encodec: EncodecCodec, wav: np.ndarray) -> None:
    with pytest.raises(AudioError):
        encodec.encode([tone(0.1, 24000), wav])


@pytest.mark.parametrize("bandwidth", [5.0, 0.0, "abc", 48])
def test_invalid_bandwidth(bandwidth: object) -> None:
    with pytest.raises(CodecError, match="1.5, 3, 6, 12, 24"):
        hf.check_bandwidth(bandwidth)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="1.5, 3, 6, 12, 24"):
        hf.load_encodec(bandwidth)  # type: ignore[arg-type]  # before any download attempt


def test_invalid_dac_model() -> None:
    for call in (
        lambda: DacCodec.random("8khz"),
        lambda: hf.load_dac("48khz"),
        lambda: load_codec("dac:22khz"),
    ):
        with pytest.raises(CodecError, match="44khz, 24khz, 16khz"):
            call()


def test_unavailable_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(CodecError, match="CUDA is not available"):
        hf.load_encodec(6.0, device="cuda")


def test_random_weights_are_seeded_and_leave_global_rng_alone(encodec: EncodecCodec) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = EncodecCodec.random(6.0, seed=0)
    assert torch.equal(torch.rand(3), expected)
    other = EncodecCodec.random(6.0, seed=1)
    wav = [tone(0.3, 24000)]
    np.testing.assert_array_equal(again.encode(wav)[0], encodec.encode(wav)[0])
    assert not np.array_equal(other.encode(wav)[0], encodec.encode(wav)[0])


# ------------------------------------------------------------------------------------------------
# Pretrained loading (offline here) and load_codec routing


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


@pytest.mark.parametrize("loader", ["encodec:6", "dac:44khz"])
def test_offline_pretrained_load_fails_fast(
    loader: str, empty_hf_cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(CodecError) as err:
        load_codec(loader)
    assert time.perf_counter() - start < 3.0
    message = str(err.value)
    assert "\n" not in message
    assert ("EnCodec" if loader.startswith("encodec") else "DAC") in message
    assert "HF_HUB_OFFLINE" in message and "built-in codec" in message


def test_unreachable_hub_fails_fast(empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE: one refused probe, no ~20 s of hub retries."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.perf_counter()
    with pytest.raises(CodecError, match="hub cannot be reached.*built-in codec"):
        hf.load_encodec(3.0)
    assert time.perf_counter() - start < 8.0


def test_load_codec_routes_to_transformers(encodec: EncodecCodec, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_fetch(class_name: str, repo: str, what: str):
        calls.append((class_name, repo))
        return encodec.model if class_name == "EncodecModel" else dac("16khz").model

    monkeypatch.setattr(hf, "fetch_pretrained", fake_fetch)
    codec = load_codec("encodec:3")
    assert isinstance(codec, EncodecCodec) and codec.n_codebooks == 4
    assert codec.spec == {
        "name": "encodec",
        "model": "facebook/encodec_24khz",
        "bandwidth": 3.0,
        "backend": "transformers",
    }
    assert load_codec("encodec").spec["bandwidth"] == 6.0
    assert calls[0] == ("EncodecModel", "facebook/encodec_24khz")

    rebuilt = codec_from_spec({**codec.spec, "backend": "somewhere-else"})
    assert same_codec(rebuilt.spec, codec.spec) and rebuilt.n_codebooks == 4

    d = load_codec("dac:16khz")
    assert isinstance(d, DacCodec) and d.spec == {"name": "dac", "model": "16khz", "backend": "transformers"}
    assert calls[-1] == ("DacModel", "descript/dac_16khz")
    assert not same_codec(d.spec, dac("16khz").spec), "random weights never pass for the pretrained ones"


# ------------------------------------------------------------------------------------------------
# Original packages: weight mapping (always) and parity (where they import)


def test_weight_norm_fold_and_unfold_roundtrip(encodec: EncodecCodec) -> None:
    from transformers import EncodecModel

    copy = EncodecModel(hf.encodec_config()).eval()
    orig.load_plain_state(copy, orig.plain_state(encodec.model))
    twin = EncodecCodec(copy, 6.0)
    wav = [tone(0.2, 24000)]
    np.testing.assert_array_equal(twin.encode(wav)[0], encodec.encode(wav)[0])


def test_original_key_names_map_to_transformers() -> None:
    e = orig.encodec_key_to_hf
    assert e("encoder.model.0.conv.conv.bias") == "encoder.layers.0.conv.bias"
    assert e("encoder.model.1.shortcut.conv.conv.weight") == "encoder.layers.1.shortcut.conv.weight"
    assert e("encoder.model.13.lstm.weight_ih_l0") == "encoder.layers.13.lstm.weight_ih_l0"
    assert e("decoder.model.3.convtr.convtr.weight") == "decoder.layers.3.conv.weight"
    assert e("quantizer.vq.layers.7._codebook.embed") == "quantizer.layers.7.codebook.embed"
    d = orig.dac_key_to_hf
    assert d("encoder.block.0.weight") == "encoder.conv1.weight"
    assert d("encoder.block.1.block.0.block.0.alpha") == "encoder.block.0.res_unit1.snake1.alpha"
    assert d("encoder.block.4.block.2.block.3.bias") == "encoder.block.3.res_unit3.conv2.bias"
    assert d("encoder.block.2.block.3.alpha") == "encoder.block.1.snake1.alpha"
    assert d("encoder.block.2.block.4.weight") == "encoder.block.1.conv1.weight"
    assert d("encoder.block.5.alpha") == "encoder.snake1.alpha"
    assert d("encoder.block.6.weight") == "encoder.conv2.weight"
    assert d("decoder.model.0.bias") == "decoder.conv1.bias"
    assert d("decoder.model.1.block.0.alpha") == "decoder.block.0.snake1.alpha"
    assert d("decoder.model.2.block.1.weight") == "decoder.block.1.conv_t1.weight"
    assert d("decoder.model.4.block.4.block.1.weight") == "decoder.block.3.res_unit3.conv1.weight"
    assert d("decoder.model.5.alpha") == "decoder.snake1.alpha"
    assert d("decoder.model.6.weight") == "decoder.conv2.weight"
    assert d("quantizer.quantizers.3.codebook.weight") == "quantizer.quantizers.3.codebook.weight"
    hf_names = set(orig.plain_state(dac("16khz").model))
    assert {d("encoder.block.5.alpha"), d("decoder.model.4.block.4.block.3.bias")} <= hf_names


def _skip_unless_imports(module: str) -> None:
    problem = orig.package_problem(module)
    if problem:
        pytest.skip(f"original-package parity not checked: {problem}")


@pytest.mark.parametrize("bandwidth", [1.5, 24.0])
def test_original_encodec_parity(encodec: EncodecCodec, bandwidth: float) -> None:
    _skip_unless_imports("encodec")
    ours = encodec.at_bandwidth(bandwidth)
    theirs = orig.original_like(ours)
    assert theirs.spec["backend"] == "encodec" and same_codec(theirs.spec, ours.spec)
    wavs = [tone(0.5, 24000), tone(0.2, 24000, seed=1)]
    codes = ours.encode(wavs)
    for a, b in zip(codes, theirs.encode(wavs), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ours.decode(codes), theirs.decode(codes), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("model", ["44khz", "16khz"])
def test_original_dac_parity(model: str) -> None:
    _skip_unless_imports("dac")
    ours = dac(model)
    theirs = orig.original_like(ours)
    assert theirs.spec["backend"] == "dac" and same_codec(theirs.spec, ours.spec)
    sr = ours.sample_rate
    wavs = [tone(0.1, sr), tone(0.03, sr, seed=1)]
    codes = ours.encode(wavs)
    for a, b in zip(codes, theirs.encode(wavs), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ours.decode(codes), theirs.decode(codes), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
