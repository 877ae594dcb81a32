"""Audio folder -> codes folder: one ``<id>.npz`` per utterance plus ``manifest.parquet``.

The id of an utterance is its audio path relative to the input folder without the extension
(``spk1/utt01``), the same id ``phonemize`` gives a transcript beside it. Files are sorted by
length and encoded in batches of about ``batch_seconds`` of audio while the next batch loads on
worker threads. Finished outputs are skipped on a rerun, so an interrupted run just continues;
``shard=(i, n)`` lets n processes split one corpus. Files that fail are listed at the end; the
rest are still written.
"""

from __future__ import annotations

import fcntl
import json
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from valle_cli import formats
from valle_cli.audio import find_audio, load_audio
from valle_cli.codecs import Codec, check_same_codec, frames_for
from valle_cli.errors import AudioError, InputError, PartialFailure, ValleError

CODEC_FILE = "codec.safetensors"


@dataclass
class Job:
    source: Path  # audio file
    id: str  # relative path without extension, posix separators
    out: Path  # npz to write
    seconds: float = 0.0  # from the file header, for sorting and batching


@dataclass
class QuantizeReport:
    written: int = 0
    skipped: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)


def _header_seconds(path: Path) -> float:
    import soundfile as sf

    try:
        return float(sf.info(path).duration)
    except Exception:  # noqa: BLE001 - unreadable here means: load it and report the real reason
        return 0.0


def plan_jobs(input_dir: Path, out_dir: Path, shard: tuple[int, int] = (0, 1)) -> tuple[list[Job], dict[str, str]]:
    """Every audio file of this shard with its id and output path; duplicate ids are failures."""
    if not input_dir.exists():
        raise InputError(f"{input_dir}: no such file or folder")
    files = find_audio(input_dir)
    if not files:
        raise InputError(f"{input_dir}: no audio files (looked for wav, flac, mp3, ogg, ... recursively)")
    index, count = shard
    jobs, failures, seen = [], {}, {}
    for path in files[index::count]:
        rel = path.relative_to(input_dir).with_suffix("")
        uid = rel.as_posix()
        if uid in seen:
            failures[str(path)] = f"same id {uid!r} as {seen[uid]} (two audio files with one name)"
            continue
        seen[uid] = str(path)
        jobs.append(Job(source=path, id=uid, out=out_dir / rel.with_suffix(".npz")))
    return jobs, failures


def sample_for_fit(input_dir: Path, sample_rate: int, max_seconds: float, seed: int) -> list[np.ndarray]:
    """Random audio files (seeded) up to max_seconds, loaded at the codec rate; bad files skipped."""
    files = find_audio(input_dir) if input_dir.is_dir() else [input_dir]
    if not files:
        raise InputError(f"{input_dir}: no audio files to fit a codec on")
    random.Random(seed).shuffle(files)
    wavs, total = [], 0.0
    for path in files:
        try:
            wav, _ = load_audio(path, sample_rate)
        except AudioError:
            continue
        wavs.append(wav)
        total += len(wav) / sample_rate
        if total >= max_seconds:
            break
    if not wavs:
        raise InputError(f"{input_dir}: no readable audio to fit a codec on")
    return wavs


def _batches(jobs: Sequence[Job], batch_seconds: float) -> list[list[Job]]:
    """Length-sorted jobs cut into batches of at most batch_seconds of audio (at least one job)."""
    ordered = sorted(jobs, key=lambda j: (j.seconds, j.id))
    batches: list[list[Job]] = []
    current: list[Job] = []
    for job in ordered:
        # Padded batch cost is len(batch) * longest; the list is sorted, so the newest is the longest.
        if current and (len(current) + 1) * max(job.seconds, 1e-3) > batch_seconds:
            batches.append(current)
            current = []
        current.append(job)
    if current:
        batches.append(current)
    return batches


def _check_existing_codec(out_dir: Path, codec: Codec) -> None:
    """Refuse to mix codecs in one folder: compare with any npz already there."""
    for existing in out_dir.rglob("*.npz"):
        try:
            spec = formats.read_codes_header(existing).codec
        except ValleError:
            continue
        check_same_codec(codec.spec, spec, f"{out_dir} already holds codes ({existing.name})")
        return


def quantize_folder(
    input_dir: Path,
    out_dir: Path,
    codec: Codec,
    *,
    batch_seconds: float = 120.0,
    workers: int = 4,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    on_progress: Callable[[float], None] | None = None,
) -> QuantizeReport:
    """Quantize every audio file under input_dir into out_dir; raise PartialFailure listing bad files."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, failures = plan_jobs(input_dir, out_dir, shard)
    report = QuantizeReport(failures=failures)
    if overwrite:
        todo = jobs
    else:
        todo = [j for j in jobs if not j.out.exists()]
        report.skipped = len(jobs) - len(todo)
        if todo:
            _check_existing_codec(out_dir, codec)
    for job in todo:
        job.seconds = _header_seconds(job.source)

    def load(job: Job) -> tuple[Job, np.ndarray | None, float]:
        try:
            wav, seconds = load_audio(job.source, codec.sample_rate)
            return job, wav, seconds
        except AudioError as e:
            report.failures[str(job.source)] = str(e).removeprefix(f"{job.source}: ")
            return job, None, job.seconds

    batches = _batches(todo, batch_seconds)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Load batch k+1 on the threads while batch k is encoded.
        pending: list[Future] = [pool.submit(load, j) for j in batches[0]] if batches else []
        for k in range(len(batches)):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(load, j) for j in batches[k + 1]] if k + 1 < len(batches) else []
            good = [(job, wav, sec) for job, wav, sec in loaded if wav is not None]
            if good:
                codes = codec.encode([wav for _, wav, _ in good])
                for (job, wav, seconds), c in zip(good, codes, strict=True):
                    expected = frames_for(len(wav), codec.sample_rate, codec.frame_rate)
                    assert c.shape == (codec.n_codebooks, expected), (c.shape, expected)
                    formats.write_codes(job.out, formats.Codes(
                        codes=np.asarray(c, dtype=np.int16), sample_rate=codec.sample_rate,
                        frame_rate=codec.frame_rate, codec=codec.spec,
                        source=str(job.source.resolve()), seconds=seconds,
                    ))
                    report.written += 1
                    report.audio_seconds += seconds
            if on_progress:
                on_progress(sum(sec for _, _, sec in loaded))
    update_manifest(out_dir)
    report.wall_seconds = time.perf_counter() - start
    if report.failures:
        raise PartialFailure(
            f"{len(report.failures)} file(s) could not be quantized "
            f"({report.written} written, {report.skipped} already done)",
            report.failures,
        )
    return report


def update_manifest(out_dir: Path) -> Path:
    """Rewrite manifest.parquet from the npz files present (under a lock: shards may finish together)."""
    lock_path = out_dir / ".manifest.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = []
        for path in sorted(out_dir.rglob("*.npz")):
            if path.name.startswith("."):
                continue
            try:
                head = formats.read_codes_header(path)
            except ValleError:
                continue  # a foreign or broken npz is not part of the corpus
            rel = path.relative_to(out_dir)
            rows.append({
                "id": rel.with_suffix("").as_posix(), "path": rel.as_posix(), "frames": int(head.shape[1]),
                "seconds": head.seconds, "codec": json.dumps(head.codec, sort_keys=True), "source": head.source,
            })
        return formats.write_manifest(out_dir, rows)


def quantize_file(source: str | Path | bytes, codec: Codec, name: str | None = None) -> formats.Codes:
    """One audio file (or its bytes) -> Codes."""
    wav, seconds = load_audio(source, codec.sample_rate, name=name)
    (codes,) = codec.encode([wav])
    origin = "" if isinstance(source, bytes) else str(Path(source).resolve())
    return formats.Codes(codes=np.asarray(codes, dtype=np.int16), sample_rate=codec.sample_rate,
                         frame_rate=codec.frame_rate, codec=codec.spec, source=origin, seconds=seconds)
