#!/usr/bin/env python
"""Hours of audio scored per minute by `valle score-chunks` (the library function), on CPU.

    python benchmarks/score_chunks.py                        # ~22 min of espeak speech, 400 files
    python benchmarks/score_chunks.py --decoded              # also: features from decoded codes
    python benchmarks/score_chunks.py --speakers 16 --per-speaker 100 --work /tmp/scbench

Makes a corpus with examples/make_corpus.py, quantizes it with a small built-in codec, then times
score_codes_folder on three layouts of the same audio: the utterances as they are (many short
sources), the same audio joined into one long source per speaker (long recordings, as in music), and,
with --decoded, the utterances with their audio gone so features come from decoded codes.
Wall time covers everything the verb does: manifest, codes, audio loading and resampling,
features, scores and the DataFrame (not the parquet write).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def prepare(root: Path, speakers: int, per_speaker: int) -> None:
    """root/corpus (utterances), root/long (one file per speaker), root/codes, root/long_codes."""
    import soundfile as sf
    from make_corpus import make_corpus

    from valle_cli.codecs.builtin import BuiltinCodec, BuiltinCodecConfig
    from valle_cli.codecs.quantize import quantize_folder, sample_for_fit

    if (root / "codes" / "manifest.parquet").exists() and (root / "long_codes" / "manifest.parquet").exists():
        return
    t = time.perf_counter()
    make_corpus(root / "corpus", speakers, per_speaker, seed=0)
    (root / "long").mkdir(parents=True, exist_ok=True)
    for spk in sorted(p for p in (root / "corpus").iterdir() if p.is_dir()):
        parts = [sf.read(p, dtype="float32") for p in sorted(spk.glob("*.wav"))]
        sf.write(root / "long" / f"{spk.name}.wav", np.concatenate([a for a, _ in parts]), parts[0][1])
    config = BuiltinCodecConfig(n_codebooks=2, codebook_size=64, kmeans_iters=10)
    codec = BuiltinCodec.fit(sample_for_fit(root / "corpus", config.sample_rate, 120, 0), config)
    codec.save(root / "codes" / "codec.safetensors")
    quantize_folder(root / "corpus", root / "codes", codec)
    quantize_folder(root / "long", root / "long_codes", codec)
    print(f"corpus made and quantized in {time.perf_counter() - t:.1f} s", file=sys.stderr)


def timed(codes: Path, workers: int, repeats: int):
    """Best of `repeats` runs of score_codes_folder (the first run also warms imports and caches)."""
    from valle_cli.data.chunks import ChunkParams, score_codes_folder

    best = None
    for _ in range(repeats):
        report = score_codes_folder(codes, ChunkParams(), device="cpu", workers=workers).report
        if report.failures:
            raise SystemExit(f"failures: {report.failures}")
        if best is None or report.wall_seconds < best.wall_seconds:
            best = report
    return best


def line(name: str, report) -> str:
    return (f"{name:<34} {report.sources:5d} sources {report.chunks:7d} chunks {report.audio_seconds / 60:7.1f} min "
            f"{report.wall_seconds:7.2f} s  -> {report.hours_per_minute:7.1f} h of audio / min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speakers", type=int, default=8)
    parser.add_argument("--per-speaker", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoded", action="store_true", help="also time features from decoded codes")
    parser.add_argument("--work", type=Path, help="keep the corpus and codes here (reused on the next run)")
    args = parser.parse_args()

    import torch

    print(f"torch threads: {torch.get_num_threads()}, workers: {args.workers}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        prepare(root, args.speakers, args.per_speaker)
        timed(root / "codes", args.workers, 1)  # warm-up: imports, page cache
        print(line("utterances, 1 worker", timed(root / "codes", 1, args.repeats)))
        print(line(f"utterances, {args.workers} workers", timed(root / "codes", args.workers, args.repeats)))
        print(line("one long source per speaker", timed(root / "long_codes", args.workers, args.repeats)))
        if args.decoded:
            hidden = root / "corpus-hidden"
            shutil.move(root / "corpus", hidden)
            try:
                report = timed(root / "codes", args.workers, 1)
            finally:
                shutil.move(hidden, root / "corpus")
            assert report.decoded == report.sources
            print(line("utterances, from decoded codes", report))


if __name__ == "__main__":
    main()
