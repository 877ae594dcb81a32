"""Shared test fixtures: a subprocess runner for the real ``valle`` command and a tiny espeak corpus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_valle(*args: str, input: bytes | None = None, cwd: Path | None = None, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m valle_cli ARGS`` as a user would; stdout/stderr captured as bytes."""
    base = {k: v for k, v in os.environ.items() if k != "VALLE_DEBUG"}
    full_env = {**base, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "valle_cli", *map(str, args)],
        input=input if input is not None else b"",
        capture_output=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )



def ok(res: subprocess.CompletedProcess) -> str:
    """stderr of a run that must have succeeded, whitespace folded."""
    assert res.returncode == 0, res.stderr.decode()
    return " ".join(res.stderr.decode().split())


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The one 'Error: ...' line of a run that must have failed with exit 1 and nothing on stdout."""
    lines = [line for line in res.stderr.decode().splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), res.stderr.decode()
    assert res.stdout == b""
    return lines[0]


def unusable_clips(good: Path, folder: Path) -> list[Path]:
    """A 10 ms click, 1 s of digital silence, and anti-phase stereo of a real voice (silent once mixed)."""
    import numpy as np
    import soundfile as sf

    audio, rate = sf.read(good, dtype="float32")
    folder.mkdir(parents=True, exist_ok=True)
    clips = [folder / "click.wav", folder / "silence.wav", folder / "antiphase.wav"]
    sf.write(clips[0], np.random.default_rng(0).uniform(-0.5, 0.5, rate // 100), rate)
    sf.write(clips[1], np.zeros(rate, np.float32), rate)
    sf.write(clips[2], np.stack([audio, -audio], axis=1), rate)
    return clips


@pytest.fixture(scope="session")
def espeak_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """corpus/<speaker>/<id>.wav + .txt: 3 voices x 4 sentences, made by examples/make_corpus.py."""
    sys.path.insert(0, str(REPO / "examples"))
    from make_corpus import make_corpus

    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, n_speakers=3, per_speaker=4, seed=0)
    return out


TINY_CODEC = ["--codebooks", "3", "--codebook-size", "64", "--fit-seconds", "20", "-q"]
TINY_TRAIN = ["--preset", "tiny", "--max-steps", "6", "--batch-tokens", "3000", "--log-every", "2", "--eval-every", "6",
              "--save-every", "6", "--device", "cpu", "--set", "prompt_seconds=[0.5,1.0]"]


@pytest.fixture(scope="session")
def tiny_run(espeak_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline as a user runs it, once per session: work/codes (a tiny fitted codec, K=3 x 64),
    work/phonemes.parquet, work/shards, and work/run: a tiny model trained 6 steps on them."""
    work = tmp_path_factory.mktemp("tiny_run")
    for args in (("quantize", espeak_corpus, "-o", work / "codes", *TINY_CODEC),
                 ("phonemize", espeak_corpus, "-o", work / "phonemes.parquet", "-q"),
                 ("shard", work / "codes", work / "phonemes.parquet", "-o", work / "shards", "--val-fraction", "0.2",
                  "-q"),
                 ("train", work / "shards", "-o", work / "run", *TINY_TRAIN)):
        res = run_valle(*args)
        assert res.returncode == 0, res.stderr.decode()
    return work


class FakeCodec:
    """A deterministic stand-in codec (2 x 16 codes at 50 frames/s of 16 kHz audio) for library tests.

    Level 0 codes the frame's RMS, level 1 its zero-crossing count; decode makes a tone whose
    loudness follows level 0. Encoding reads the audio, so corrupt inputs still matter.
    """

    def __init__(self, tag: str = "a") -> None:
        self.spec = {"name": "fake", "tag": tag}
        self.sample_rate, self.frame_rate, self.n_codebooks, self.codebook_size = 16000, 50.0, 2, 16
        self.hop = int(self.sample_rate / self.frame_rate)
        self.calls: list[int] = []  # batch sizes seen by encode

    def encode(self, wavs):
        import numpy as np

        from valle_cli.codecs import frames_for

        self.calls.append(len(wavs))
        out = []
        for wav in wavs:
            t = frames_for(len(wav), self.sample_rate, self.frame_rate)
            frames = np.pad(wav, (0, t * self.hop - len(wav))).reshape(t, self.hop)
            rms = np.sqrt((frames**2).mean(axis=1))
            zc = (np.diff(np.sign(frames), axis=1) != 0).sum(axis=1)
            out.append(np.stack([np.minimum(rms * 40, 15), np.minimum(zc // 20, 15)]).astype(np.int64))
        return out

    def decode(self, codes):
        import numpy as np

        out = []
        for c in codes:
            amp = np.repeat(c[0] / 40.0, self.hop)
            t = np.arange(len(amp)) / self.sample_rate
            out.append((amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
        return out


@pytest.fixture
def fake_codec() -> FakeCodec:
    return FakeCodec()
