"""Reading any audio file into mono float32 at a codec's rate, and writing wavs.

Accepts wav (8/16/24/32-bit int, float), flac, ogg and mp3 through libsndfile, with librosa's
decoders as a fallback; mixes channels to mono and resamples with soxr. A file is read, mixed and
resampled in blocks (``MonoStream``), so memory does not grow with its length beyond the mono signal
at the codec rate (and not at all for a reader of the blocks); a file longer than the limit of
``max_audio_seconds`` is refused before it is read. Every failure is an AudioError naming the file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from valle_cli.errors import AudioError, InputError

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif")
MIN_SECONDS = 0.05  # shorter clips make fewer than ~4 code frames: nothing a model can learn from
BLOCK_FRAMES = 1 << 16  # input frames decoded, mixed and resampled at a time (~1.4 s at 48 kHz)
MAX_HOURS_SETTING = "VALLE_MAX_AUDIO_HOURS"
# Longest file accepted. Whole-file readers hold its mono signal at the codec rate (4 h at 24 kHz is
# 1.4 GB of float32); quantize streams it, but a model cannot use one utterance of hours anyway.
DEFAULT_MAX_HOURS = 4.0


def find_audio(folder: Path) -> list[Path]:
    """Audio files under folder, recursively, in a stable order (hidden files and folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(Path(root) / name)
    return found


def max_audio_seconds() -> float:
    """The longest audio file accepted, in seconds: $VALLE_MAX_AUDIO_HOURS hours, else DEFAULT_MAX_HOURS."""
    text = os.environ.get(MAX_HOURS_SETTING, "").strip()
    try:
        hours = float(text) if text else DEFAULT_MAX_HOURS
    except ValueError:
        hours = float("nan")
    if not hours > 0:
        raise InputError(f"{MAX_HOURS_SETTING}={text}: expected a positive number of hours")
    return hours * 3600


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.1f} s"


def _too_long(name: str, seconds: float, limit: float) -> AudioError:
    return AudioError(f"{name}: {_hours(seconds)} of audio, over the limit of {_hours(limit)} per file "
                      f"(set {MAX_HOURS_SETTING} to raise it)")


def _sf_blocks(f, name: str) -> Iterator[np.ndarray]:
    """Blocks (n, C) float32 of an open soundfile.SoundFile until its end."""
    import soundfile as sf

    while True:
        try:
            block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
            raise AudioError(f"{name}: not a readable audio file ({e})") from None
        if len(block) == 0:
            return
        yield block


def _fallback_blocks(source: Path, name: str, max_seconds: float, first_error: Exception) -> tuple[Iterator, int]:
    """Blocks (n, C) float32 and the rate of a file libsndfile cannot open (m4a, some mp3s), decoded whole
    by librosa's audioread backend after its header's duration is checked against the limit."""
    import warnings

    import librosa

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds = float(librosa.get_duration(path=str(source)))
            if seconds > max_seconds:
                raise _too_long(name, seconds, max_seconds)
            data, rate = librosa.load(source, sr=None, mono=False)
    except AudioError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise AudioError(f"{name}: not a readable audio file ({first_error})") from None
    data = (np.atleast_2d(data).T if data.ndim == 1 else data.T).astype(np.float32)  # (S, C)
    return (data[i:i + BLOCK_FRAMES] for i in range(0, len(data), BLOCK_FRAMES)), int(rate)


class MonoStream:
    """An audio file (path or in-memory bytes) as blocks of mono float32 samples at ``sample_rate``.

    Each iteration reads the file again, BLOCK_FRAMES input frames at a time: decode (n, C), check for
    NaN / inf, mix to mono, resample with soxr's streaming resampler (whose output equals resampling the
    whole signal at once, sample for sample). A file whose header says it is longer than ``max_seconds``
    is refused before anything is decoded, and so is one that turns out longer while being read. After a
    full iteration ``seconds`` is the duration read; empty and too-short files raise AudioError then.
    """

    def __init__(self, source: str | Path | bytes, sample_rate: int, name: str | None = None,
                 min_seconds: float = MIN_SECONDS, max_seconds: float | None = None):
        self.name = name or str(source if not isinstance(source, bytes) else "<stdin>")
        if not isinstance(source, bytes):
            source = Path(source)
            if not source.is_file():
                raise AudioError(f"{self.name}: no such file")
            if source.stat().st_size == 0:
                raise AudioError(f"{self.name}: empty file (0 bytes)")
        elif not source:
            raise AudioError(f"{self.name}: empty input (0 bytes)")
        self.source, self.sample_rate = source, sample_rate
        self.min_seconds = min_seconds
        self.max_seconds = max_audio_seconds() if max_seconds is None else max_seconds
        self.seconds = 0.0
        self.expected_samples = 0  # at sample_rate, from the header, once iteration has begun

    def __iter__(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        handle = io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source
        try:
            f = sf.SoundFile(handle)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as sf_error:
            if isinstance(self.source, bytes):  # libsndfile's own text names the stream by its repr: leave it out
                reason = getattr(sf_error, "error_string", sf_error)
                raise AudioError(f"{self.name}: not a readable audio file ({reason})") from None
            blocks, rate = _fallback_blocks(self.source, self.name, self.max_seconds, sf_error)
            yield from self._mono(blocks, rate)
            return
        with f:
            if f.frames / f.samplerate > self.max_seconds:
                raise _too_long(self.name, f.frames / f.samplerate, self.max_seconds)
            self.expected_samples = int(np.ceil(f.frames * self.sample_rate / f.samplerate)) + 16
            yield from self._mono(_sf_blocks(f, self.name), int(f.samplerate))

    def _mono(self, blocks: Iterator[np.ndarray], rate: int) -> Iterator[np.ndarray]:
        """(n, C) blocks at ``rate`` -> mono blocks at sample_rate; sets ``seconds`` at the end."""
        import soxr

        resampler = None if rate == self.sample_rate else soxr.ResampleStream(
            rate, self.sample_rate, 1, dtype="float32", quality="HQ")
        frames = 0
        for block in blocks:
            if not np.isfinite(block).all():
                raise AudioError(f"{self.name}: contains NaN or infinite samples")
            frames += len(block)
            if frames / rate > self.max_seconds:  # a header that under-states the length
                raise _too_long(self.name, frames / rate, self.max_seconds)
            mono = block.mean(axis=1)  # (n,)
            yield mono if resampler is None else resampler.resample_chunk(mono)
        self.seconds = frames / rate
        if frames == 0:
            raise AudioError(f"{self.name}: no audio samples")
        if self.seconds < self.min_seconds:
            raise AudioError(f"{self.name}: too short ({self.seconds * 1000:.0f} ms < "
                             f"{self.min_seconds * 1000:.0f} ms)")
        if resampler is not None:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def _collect(stream: MonoStream) -> np.ndarray:
    """The stream's blocks in one float32 array, allocated once at the length the header gives (grown if the
    header under-states it): no list of blocks plus a copy of them."""
    out, n = np.empty(0, np.float32), 0
    for block in stream:
        if n + len(block) > len(out):
            grown = np.empty(max(2 * len(out), n + len(block), stream.expected_samples), np.float32)
            grown[:n] = out[:n]
            out = grown
        out[n:n + len(block)] = block
        n += len(block)
    return out[:n]


def load_audio(source: str | Path | bytes, sample_rate: int, name: str | None = None,
               min_seconds: float = MIN_SECONDS, max_seconds: float | None = None) -> tuple[np.ndarray, float]:
    """Mono float32 samples at ``sample_rate`` and the original duration in seconds.

    Raises AudioError for missing, empty, corrupt, too short, too long (over ``max_seconds``, by default
    ``max_audio_seconds()``), or non-finite audio.
    """
    stream = MonoStream(source, sample_rate, name, min_seconds, max_seconds)
    mono = _collect(stream)
    peak = float(np.abs(mono).max(initial=0.0))
    if peak > 1.0:  # float files may exceed full scale; keep the waveform, bring it into range
        mono /= peak
    return mono, stream.seconds


def wav_bytes(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """A complete wav file in memory (for atomic writes and stdout)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, subtype=subtype, format="WAV")
    return buf.getvalue()
