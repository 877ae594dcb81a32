#!/usr/bin/env python
"""Audio seconds quantized per wall-second: the batched folder path vs a per-file loop.

    python benchmarks/quantize.py                         # built-in codec, CPU
    python benchmarks/quantize.py --codec encodec --device cuda
    python benchmarks/quantize.py --speakers 12 --per-speaker 40 --batch-seconds 240
    python benchmarks/quantize.py --long-file-memory          # peak memory of one 1-hour file

The batched path is `valle quantize`'s library function: files sorted by length, encoded in
padded batches while the next batch loads on worker threads. The loop loads, encodes and writes
one file at a time with the same codec. Both write the same npz files. EnCodec and DAC are built
with random weights (no download); their speed does not depend on the weights.

--long-file-memory instead writes silent files of --long-file-minutes (a 24 kHz mono wav and a
192 kHz 6-channel FLAC) and quantizes each with the built-in codec in a fresh process, once as a
single file and once as a folder, printing that process's peak resident memory (max RSS) and how
much of it the file added over the loaded codec.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def build_codec(name: str, corpus: Path, device: str, codebook_size: int):
    if name == "builtin":
        from valle_cli.codecs.builtin import BuiltinCodec, BuiltinCodecConfig
        from valle_cli.codecs.quantize import sample_for_fit

        config = BuiltinCodecConfig(codebook_size=codebook_size, kmeans_iters=10)
        t = time.perf_counter()
        codec = BuiltinCodec.fit(sample_for_fit(corpus, config.sample_rate, 600, 0), config, device=device)
        print(f"fitted builtin 8 x {codebook_size} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        return codec
    from valle_cli.codecs.hf import DacCodec, EncodecCodec

    if name == "encodec":
        return EncodecCodec.random(bandwidth=6.0, device=device)
    return DacCodec.random(model="24khz", device=device)


def per_file_loop(corpus: Path, out: Path, codec) -> float:
    from valle_cli import formats
    from valle_cli.codecs.audio import find_audio
    from valle_cli.codecs.quantize import quantize_file

    seconds = 0.0
    for path in find_audio(corpus):
        item = quantize_file(path, codec)
        formats.write_codes(out / path.relative_to(corpus).with_suffix(".npz"), item)
        seconds += item.seconds
    return seconds


# Run in a fresh process: ru_maxrss is the peak resident memory of the whole process.
_MEASURE = """
import resource, sys, time
from pathlib import Path
from valle_cli.codecs.builtin import BuiltinCodec
from valle_cli.codecs.quantize import quantize_file, quantize_folder
codec = BuiltinCodec.load(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if sys.argv[3] == "file":
    quantize_file(Path(sys.argv[2]), codec)
else:
    quantize_folder(Path(sys.argv[2]), Path(sys.argv[4]), codec)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base / 2**20, peak / 2**20, time.perf_counter() - t)
"""


def write_silence(path: Path, minutes: float, rate: int, channels: int) -> None:
    """A silent 16-bit file written a minute at a time (FLAC for big ones: silence compresses to almost nothing)."""
    import soundfile as sf

    block = np.zeros((rate * 60, channels), dtype=np.int16)
    with sf.SoundFile(path, "w", rate, channels, subtype="PCM_16") as f:
        for _ in range(int(minutes)):
            f.write(block)
        f.write(block[: int(rate * 60 * (minutes % 1))])


def long_file_memory(minutes: float) -> None:
    """Peak memory of quantizing one long silent file with the built-in codec, as a file and in a folder."""
    from valle_cli.codecs.builtin import BuiltinCodec, BuiltinCodecConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        noise = np.random.default_rng(0).uniform(-0.3, 0.3, 24000 * 30).astype(np.float32)
        BuiltinCodec.fit([noise], BuiltinCodecConfig(kmeans_iters=2)).save(root / "codec.safetensors")
        print(f"{'file':<34} {'path':<7} {'peak GB':>8} {'file GB':>8} {'wall s':>7}")
        for name, rate, channels in [("24k-mono.wav", 24000, 1), ("192k-6ch.flac", 192000, 6)]:
            (root / name).mkdir()
            audio = root / name / name
            write_silence(audio, minutes, rate, channels)
            label = f"{minutes:g} min {rate // 1000} kHz {channels} ch {audio.suffix[1:]}"
            for how in ["file", "folder"]:
                res = subprocess.run([sys.executable, "-c", _MEASURE, str(root / "codec.safetensors"), str(audio.parent
                                      if how == "folder" else audio), how, str(root / f"codes-{name}")],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"{label:<34} {how:<7} failed: {res.stderr.strip().splitlines()[-1:]}")
                    continue
                base, peak, wall = (float(x) for x in res.stdout.split())
                print(f"{label:<34} {how:<7} {peak:8.2f} {peak - base:8.2f} {wall:7.1f}")
            audio.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codec", choices=["builtin", "encodec", "dac"], default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--speakers", type=int, default=8)
    parser.add_argument("--per-speaker", type=int, default=30)
    parser.add_argument("--batch-seconds", type=float, default=None, help="default: 120 on a GPU, 20 on CPU")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--encoders", type=int, default=None, help="default: 1 on a GPU, one per core on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each path")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--long-file-memory", action="store_true",
                        help="measure the peak memory of quantizing one long silent file instead")
    parser.add_argument("--long-file-minutes", type=float, default=60.0)
    args = parser.parse_args()
    if args.long_file_memory:
        long_file_memory(args.long_file_minutes)
        return

    import torch
    from make_corpus import make_corpus

    from valle_cli.codecs.quantize import quantize_folder
    from valle_cli.common import torch_threads

    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "corpus", args.speakers, args.per_speaker, seed=0)
        codec = build_codec(args.codec, root / "corpus", args.device, args.codebook_size)

        # warm-up (first-call allocations, lazy imports) on a throwaway folder
        per_file_loop(root / "corpus" / "spk00", root / "warm", codec)

        # Alternate the two paths and keep each one's best run: a shared machine's noise is one-sided.
        loop_wall = batched_wall = float("inf")
        for _ in range(args.repeats):
            shutil.rmtree(root / "loop", ignore_errors=True)
            t = time.perf_counter()
            seconds = per_file_loop(root / "corpus", root / "loop", codec)
            loop_wall = min(loop_wall, time.perf_counter() - t)

            shutil.rmtree(root / "batched", ignore_errors=True)
            t = time.perf_counter()
            report = quantize_folder(root / "corpus", root / "batched", codec, batch_seconds=args.batch_seconds,
                                     workers=args.workers, encoders=args.encoders)
            batched_wall = min(batched_wall, time.perf_counter() - t)
        cores = torch.get_num_threads()
        if args.device == "cpu":
            with torch_threads(1):
                t = time.perf_counter()
                per_file_loop(root / "corpus", root / "loop-one-thread", codec)
                one_thread_wall = time.perf_counter() - t

        same = all(
            np.array_equal(np.load(p)["codes"], np.load(root / "batched" / p.relative_to(root / "loop"))["codes"])
            for p in sorted((root / "loop").rglob("*.npz"))[:20]
        )
    print(f"codec {args.codec}, {report.written} files, {seconds:.0f} s of audio, best of {args.repeats}")
    print(f"per-file loop : {seconds / loop_wall:8.1f} audio s / s  ({loop_wall:.2f} s)")
    print(f"batched       : {seconds / batched_wall:8.1f} audio s / s  ({batched_wall:.2f} s)")
    print(f"speed-up      : {loop_wall / batched_wall:8.2f} x   (codes identical on 20 checked files: {same})")
    if args.device == "cpu":
        # Batching does not shrink a CPU's arithmetic: the most any schedule can gain over the loop
        # is spreading the single-threaded loop's work perfectly over the cores.
        print(f"CPU ceiling   : {loop_wall / (one_thread_wall / cores):8.2f} x   (one-thread loop "
              f"{one_thread_wall:.2f} s spread over {cores} cores)")


if __name__ == "__main__":
    main()
