"""quantize_folder: mirrors the tree, batches by length, resumes, shards, and lists bad files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from conftest import FakeCodec

from valle_cli import formats
from valle_cli.codecs.quantize import Job, _batches, plan_jobs, quantize_file, quantize_folder
from valle_cli.errors import CodecMismatchError, InputError, PartialFailure


def _write(path, seconds, rate=16000, freq=300.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t) * (1 + np.sin(t * 7)), rate)


@pytest.fixture
def audio_dir(tmp_path):
    root = tmp_path / "audio"
    for i, sec in enumerate([0.4, 1.3, 0.7, 2.1]):
        _write(root / f"spk{i % 2}" / f"u{i}.wav", sec, freq=200 + 50 * i)
    return root


def test_folder_is_mirrored_with_manifest(audio_dir, tmp_path, fake_codec):
    out = tmp_path / "codes"
    report = quantize_folder(audio_dir, out, fake_codec, batch_seconds=3.0)
    assert report.written == 4 and report.skipped == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == [
        "spk0/u0.npz", "spk0/u2.npz", "spk1/u1.npz", "spk1/u3.npz"]
    item = formats.read_codes(out / "spk1/u3.npz")
    assert item.codes.shape == (2, 105) and item.codec == fake_codec.spec
    assert item.source == str((audio_dir / "spk1/u3.wav").resolve())
    assert item.seconds == pytest.approx(2.1)
    manifest = formats.read_manifest(out)
    assert manifest["id"].to_list() == ["spk0/u0", "spk0/u2", "spk1/u1", "spk1/u3"]
    assert manifest.filter(manifest["id"] == "spk1/u3")["frames"].item() == 105


def test_batched_equals_per_file(audio_dir, tmp_path):
    batched, single = FakeCodec(), FakeCodec()
    quantize_folder(audio_dir, tmp_path / "b", batched, batch_seconds=100.0)
    quantize_folder(audio_dir, tmp_path / "s", single, batch_seconds=0.0)
    assert batched.calls == [4] and single.calls == [1, 1, 1, 1]
    for p in (tmp_path / "b").rglob("*.npz"):
        q = tmp_path / "s" / p.relative_to(tmp_path / "b")
        assert np.array_equal(formats.read_codes(p).codes, formats.read_codes(q).codes)


def test_batches_are_length_sorted_and_bounded():
    jobs = [Job(source=None, id=str(i), out=None, seconds=s) for i, s in enumerate([5, 1, 3, 2, 4])]
    batches = _batches(jobs, batch_seconds=6.0)
    assert [[j.seconds for j in b] for b in batches] == [[1, 2], [3], [4], [5]]
    assert all(len(b) * b[-1].seconds <= 6.0 or len(b) == 1 for b in batches)


def test_rerun_skips_and_overwrite_redoes(audio_dir, tmp_path, fake_codec):
    out = tmp_path / "codes"
    quantize_folder(audio_dir, out, fake_codec)
    mtime = (out / "spk0/u0.npz").stat().st_mtime_ns
    again = quantize_folder(audio_dir, out, fake_codec)
    assert (again.written, again.skipped) == (0, 4)
    assert (out / "spk0/u0.npz").stat().st_mtime_ns == mtime
    redo = quantize_folder(audio_dir, out, fake_codec, overwrite=True)
    assert redo.written == 4


def test_interrupted_run_continues(audio_dir, tmp_path, fake_codec):
    out = tmp_path / "codes"
    quantize_folder(audio_dir, out, fake_codec)
    (out / "spk1/u1.npz").unlink()
    report = quantize_folder(audio_dir, out, fake_codec)
    assert (report.written, report.skipped) == (1, 3)
    assert len(formats.read_manifest(out)) == 4


def test_shards_split_the_corpus(audio_dir, tmp_path, fake_codec):
    out = tmp_path / "codes"
    parts = [quantize_folder(audio_dir, out, fake_codec, shard=(i, 3)).written for i in range(3)]
    assert sum(parts) == 4 and all(p >= 1 for p in parts)
    assert len(formats.read_manifest(out)) == 4


def test_bad_files_are_listed_and_the_rest_written(audio_dir, tmp_path, fake_codec):
    (audio_dir / "spk0/empty.wav").write_bytes(b"")
    (audio_dir / "spk0/corrupt.wav").write_bytes(b"RIFF" + b"\x01" * 100)
    sf.write(audio_dir / "spk1/nan.wav", np.full(4000, np.inf), 16000, subtype="FLOAT")
    _write(audio_dir / "spk1/click.wav", 0.01)
    out = tmp_path / "codes"
    with pytest.raises(PartialFailure) as info:
        quantize_folder(audio_dir, out, fake_codec)
    assert sorted(k.rsplit("/", 1)[1] for k in info.value.failures) == [
        "click.wav", "corrupt.wav", "empty.wav", "nan.wav"]
    assert len(list(out.rglob("*.npz"))) == 4
    assert not list(out.rglob(".*tmp*"))


def test_duplicate_ids_are_failures(audio_dir, tmp_path, fake_codec):
    _write(audio_dir / "spk0/u0.flac", 0.5)
    jobs, failures = plan_jobs(audio_dir, tmp_path / "c")
    assert len(jobs) == 4 and len(failures) == 1 and "same id" in next(iter(failures.values()))


def test_mixing_codecs_in_one_folder_is_refused(audio_dir, tmp_path):
    out = tmp_path / "codes"
    quantize_folder(audio_dir, out, FakeCodec("a"))
    _write(audio_dir / "spk0/new.wav", 0.5)
    with pytest.raises(CodecMismatchError, match="already holds codes"):
        quantize_folder(audio_dir, out, FakeCodec("b"))


def test_missing_and_empty_inputs(tmp_path, fake_codec):
    with pytest.raises(InputError, match="no such file"):
        quantize_folder(tmp_path / "nope", tmp_path / "o", fake_codec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no audio files"):
        quantize_folder(tmp_path / "empty", tmp_path / "o", fake_codec)


def test_quantize_file_matches_folder(audio_dir, tmp_path, fake_codec):
    quantize_folder(audio_dir, tmp_path / "codes", fake_codec)
    single = quantize_file(audio_dir / "spk1/u3.wav", fake_codec)
    assert np.array_equal(single.codes, formats.read_codes(tmp_path / "codes/spk1/u3.npz").codes)


def test_parallel_encoders_write_the_same_files_and_restore_torch_threads(audio_dir, tmp_path):
    import torch

    class ThreadLoggingCodec(FakeCodec):
        def __init__(self):
            super().__init__()
            self.torch_threads = set()

        def encode(self, wavs):
            self.torch_threads.add(torch.get_num_threads())
            return super().encode(wavs)

    before = torch.get_num_threads()
    one, many = ThreadLoggingCodec(), ThreadLoggingCodec()
    quantize_folder(audio_dir, tmp_path / "one", one, batch_seconds=0.0, encoders=1)
    report = quantize_folder(audio_dir, tmp_path / "many", many, batch_seconds=0.0, encoders=3)
    assert report.written == 4 and sorted(many.calls) == [1, 1, 1, 1]
    assert one.torch_threads == many.torch_threads == {1}  # on CPU encoders run torch single-threaded ...
    assert torch.get_num_threads() == before  # ... and the caller's setting comes back
    for p in (tmp_path / "one").rglob("*.npz"):
        q = tmp_path / "many" / p.relative_to(tmp_path / "one")
        assert np.array_equal(formats.read_codes(p).codes, formats.read_codes(q).codes)


def test_an_encoder_error_propagates_and_leaves_no_partial_file(audio_dir, tmp_path):
    class Failing(FakeCodec):
        def encode(self, wavs):
            if any(len(w) > 16000 for w in wavs):
                raise RuntimeError("boom")
            return super().encode(wavs)

    with pytest.raises(RuntimeError, match="boom"):
        quantize_folder(audio_dir, tmp_path / "codes", Failing(), batch_seconds=0.0, encoders=2)
    for p in (tmp_path / "codes").rglob("*.npz"):
        formats.read_codes(p)  # whatever was written is whole
    assert not list((tmp_path / "codes").rglob("*.tmp*"))


def test_neural_codes_do_not_depend_on_the_core_count(audio_dir, tmp_path):
    import torch

    from valle_cli.codecs.hf import EncodecCodec

    codec = EncodecCodec.random(bandwidth=6.0)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            quantize_folder(audio_dir, tmp_path / f"t{threads}", codec, batch_seconds=2.0, encoders=1)
    finally:
        torch.set_num_threads(before)
    for p in (tmp_path / "t1").rglob("*.npz"):
        assert np.array_equal(formats.read_codes(p).codes, formats.read_codes(tmp_path / "t2" / p.relative_to(
            tmp_path / "t1")).codes), p


def test_long_files_are_streamed_in_windows_with_the_codes_of_whole_files(audio_dir, tmp_path, monkeypatch):
    """Files over WINDOW_SECONDS are read and encoded window by window in the encoder thread; the fake
    codec's frames see only their own samples, so the joined codes equal whole-file encoding exactly."""
    from valle_cli.codecs import quantize

    whole, windowed = FakeCodec(), FakeCodec()
    quantize_folder(audio_dir, tmp_path / "whole", whole, batch_seconds=100.0)
    monkeypatch.setattr(quantize, "WINDOW_SECONDS", 0.3)
    monkeypatch.setattr(quantize, "CONTEXT_SECONDS", 0.05)
    report = quantize_folder(audio_dir, tmp_path / "windowed", windowed, batch_seconds=100.0)
    assert report.written == 4 and not report.failures
    assert windowed.calls == [1] * (2 + 3 + 5 + 7)  # 0.4, 0.7, 1.3, 2.1 s in windows of 0.3 s
    for p in (tmp_path / "whole").rglob("*.npz"):
        a, b = formats.read_codes(p), formats.read_codes(tmp_path / "windowed" / p.relative_to(tmp_path / "whole"))
        assert np.array_equal(a.codes, b.codes) and a.seconds == b.seconds


def test_streamed_audio_above_full_scale_is_scaled_like_whole_audio(tmp_path):
    """A float file peaking at 3.0 is divided by its peak; streaming learns the peak at the end and encodes
    again, giving the codes of the whole-file path."""
    from valle_cli.codecs.audio import MonoStream, load_audio
    from valle_cli.codecs.quantize import encode_stream

    t = np.arange(16000 * 2) / 16000
    sf.write(tmp_path / "loud.wav", 3.0 * np.sin(2 * np.pi * 5 * t) * np.sin(2 * np.pi * 440 * t), 16000,
             subtype="FLOAT")
    codec = FakeCodec()
    (whole,) = codec.encode([load_audio(tmp_path / "loud.wav", 16000)[0]])
    windowed = encode_stream(MonoStream(tmp_path / "loud.wav", 16000), codec, window_seconds=0.3,
                             context_seconds=0.04)
    assert np.array_equal(windowed, whole)
    assert np.array_equal(quantize_file(tmp_path / "loud.wav", codec).codes, whole)


def test_file_over_the_length_limit_is_a_listed_failure(audio_dir, tmp_path, monkeypatch, fake_codec):
    monkeypatch.setenv("VALLE_MAX_AUDIO_HOURS", str(1.0 / 3600))  # 1 s: u1 (1.3 s) and u3 (2.1 s) are over
    with pytest.raises(PartialFailure) as info:
        quantize_folder(audio_dir, tmp_path / "codes", fake_codec)
    assert info.value.failures == {
        str(audio_dir / "spk1/u1.wav"): "1.3 s of audio, over the limit of 1.0 s per file "
                                        "(set VALLE_MAX_AUDIO_HOURS to raise it)",
        str(audio_dir / "spk1/u3.wav"): "2.1 s of audio, over the limit of 1.0 s per file "
                                        "(set VALLE_MAX_AUDIO_HOURS to raise it)",
    }
    assert sorted(p.name for p in (tmp_path / "codes").rglob("*.npz")) == ["u0.npz", "u2.npz"]
