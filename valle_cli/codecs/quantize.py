"""Audio folder -> codes folder: one ``<id>.npz`` per utterance plus ``manifest.parquet``.

The id of an utterance is its audio path relative to the input folder without the extension
(``spk1/utt01``), the same id ``phonemize`` gives a transcript beside it. Files are sorted by
length and encoded in batches of about ``batch_seconds`` of audio while the next batch loads on
worker threads. Finished outputs are skipped on a rerun, so an interrupted run just continues;
``shard=(i, n)`` lets n processes split one corpus. Files that fail are listed at the end; the
rest are still written. A file longer than ``WINDOW_SECONDS`` is never held whole: it is read block by
block and encoded a window at a time (``encode_stream``), so memory stays flat in its length.
"""

from __future__ import annotations

import fcntl
import json
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import formats
from valle_cli.codecs import Codec, FolderReport, check_same_codec, frames_for
from valle_cli.codecs.audio import MonoStream, find_audio, load_audio
from valle_cli.common import torch_threads
from valle_cli.errors import AudioError, InputError, PartialFailure, ValleError

CODEC_FILE = "codec.safetensors"
# Padded audio per encoder batch. A GPU wants large batches; on a CPU, batches much larger than
# this make conv codecs slower (their activations fall out of cache: EnCodec ran at 0.55x the
# per-file speed with 30 s batches, 1.06x with 10 s).
ACCELERATOR_BATCH_SECONDS = 120.0
CPU_BATCH_SECONDS = 20.0
# Longer files are encoded a window at a time, each window seeing CONTEXT_SECONDS of audio either side
# whose codes are dropped. The built-in codec's frames see 27 ms either side, so its codes do not change;
# a neural codec's frames near a join see 1 s of context instead of the whole file.
WINDOW_SECONDS = 60.0
CONTEXT_SECONDS = 1.0


@dataclass
class Job:
    source: Path  # audio file
    id: str  # relative path without extension, posix separators
    out: Path  # npz to write
    seconds: float = 0.0  # from the file header, for sorting and batching


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


@dataclass(frozen=True)
class FitOptions:
    """How ``valle quantize`` fits the built-in codec when no --codec is given."""

    seconds: float = 1200.0  # audio sampled for fitting
    n_codebooks: int = 8
    codebook_size: int = 1024
    frame_rate: float = 75.0  # code frames per second; fewer frames = shorter sequences for the model
    seed: int = 0

    def codec_config(self) -> Any:
        """The BuiltinCodecConfig these options fit: hop = sample_rate / frame_rate, window 4 x hop."""
        from valle_cli.codecs.builtin import BuiltinCodecConfig

        rate = BuiltinCodecConfig.sample_rate
        hop = rate / self.frame_rate
        if self.frame_rate <= 0 or abs(hop - round(hop)) > 1e-6 or round(hop) < 16:
            raise InputError(f"--frame-rate {self.frame_rate:g}: the built-in codec needs {rate} / frame rate to be a "
                             f"whole number of samples (>= 16), e.g. 75, 50, 37.5, 25")
        return BuiltinCodecConfig(hop_length=round(hop), n_fft=4 * round(hop), n_codebooks=self.n_codebooks,
                                  codebook_size=self.codebook_size)


def fit_codec_file(input_path: Path, out: Path, options: FitOptions, device: str,
                   say: Callable[[str], None] = lambda _: None,
                   detail: Callable[[str], None] | None = None) -> None:
    """Fit the built-in codec on a seeded sample of ``input_path`` and save it to ``out``; ``say`` hears of the
    start and the end, ``detail`` of every codebook."""
    from valle_cli.codecs.builtin import BuiltinCodec

    config = options.codec_config()
    out.parent.mkdir(parents=True, exist_ok=True)  # an unwritable output fails now, not after the fit
    start = time.perf_counter()
    wavs = sample_for_fit(input_path, config.sample_rate, options.seconds, options.seed)
    seconds = sum(len(w) for w in wavs) / config.sample_rate
    say(f"fitting the built-in codec ({options.n_codebooks} x {options.codebook_size}, {options.frame_rate:g} "
        f"frames/s) on {seconds:.0f} s of audio ...")
    codec = BuiltinCodec.fit(wavs, config, seed=options.seed, device=device, progress=detail)
    codec.save(out)
    say(f"fitted in {time.perf_counter() - start:.1f} s -> {out}")


def folder_codec(input_dir: Path, out_dir: Path, name: str | None, fit: FitOptions, device: str,
                 shard: tuple[int, int] = (0, 1), say: Callable[[str], None] = lambda _: None,
                 detail: Callable[[str], None] | None = None) -> Codec:
    """The codec of a folder run: the one named, else ``out_dir``/codec.safetensors, fitted on the input
    first when it is missing (the parts of a sharded run must share one: fit it first, then)."""
    from valle_cli.codecs import load_codec

    codec_path = out_dir / CODEC_FILE
    if name is None and not codec_path.exists():
        if shard != (0, 1):
            raise InputError(f"--shard needs one codec for all parts: fit it first with "
                             f"'valle quantize --fit-codec {input_dir} -o {codec_path}'")
        fit_codec_file(input_dir, codec_path, fit, device, say, detail)
    return load_codec(name or str(codec_path), device)


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


def _on_cpu(codec: Codec) -> bool:
    import torch

    device = getattr(codec, "device", None)
    return device is None or torch.device(device).type == "cpu"


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
    batch_seconds: float | None = None,
    workers: int = 4,
    encoders: int | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    on_progress: Callable[[float], None] | None = None,
) -> FolderReport:
    """Quantize every audio file under input_dir into out_dir; raise PartialFailure listing bad files.

    ``workers`` threads load audio ahead of ``encoders`` threads that encode and write whole batches.
    On a GPU one encoder fed large batches keeps the device busy; on a CPU (the defaults there: one
    encoder per core, 20 s batches) each encoder runs torch single-threaded, so the cores work on
    different batches instead of splitting small ops between them, writing one batch overlaps
    encoding the next, and a batch's activations stay small enough for the caches.
    """
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    todo, report = _jobs_to_do(input_dir, out_dir, codec, overwrite, shard)
    on_cpu = _on_cpu(codec)
    batch_seconds, encoders = _encoder_settings(on_cpu, batch_seconds, encoders)
    # On CPU every encoder runs torch single-threaded, even alone: the codes of a neural codec then do
    # not depend on the machine's core count (EnCodec's differ in ~1% of places between 1 and 2 threads).
    with torch_threads(1 if on_cpu else None):
        _encode_batches(_batches(todo, batch_seconds), codec, workers, encoders, report, on_progress)
    update_manifest(out_dir)
    report.wall_seconds = time.perf_counter() - start
    if report.failures:
        raise PartialFailure(
            f"{len(report.failures)} file(s) could not be quantized "
            f"({report.written} written, {report.skipped} already done)",
            report.failures,
        )
    return report


def pending_seconds(input_dir: Path, out_dir: Path, overwrite: bool = False, shard: tuple[int, int] = (0, 1)) -> float:
    """Audio seconds (from the file headers) that ``quantize_folder`` will encode: the total of a progress bar."""
    jobs, _ = plan_jobs(input_dir, out_dir, shard)
    return sum(_header_seconds(j.source) for j in jobs if overwrite or not j.out.exists())


def _jobs_to_do(input_dir: Path, out_dir: Path, codec: Codec, overwrite: bool,
                shard: tuple[int, int]) -> tuple[list[Job], FolderReport]:
    """The jobs whose npz is still missing (all of them with ``overwrite``), their audio seconds read from
    the file headers, and a report counting the skipped ones and the duplicate ids."""
    jobs, failures = plan_jobs(input_dir, out_dir, shard)
    report = FolderReport(failures=failures)
    todo = jobs if overwrite else [j for j in jobs if not j.out.exists()]
    report.skipped = len(jobs) - len(todo)
    if todo and not overwrite:
        _check_existing_codec(out_dir, codec)
    for job in todo:
        job.seconds = _header_seconds(job.source)
    return todo, report


def _encoder_settings(on_cpu: bool, batch_seconds: float | None, encoders: int | None) -> tuple[float, int]:
    """(seconds per batch, encoder threads): the defaults are 20 s and one per torch thread (core, at most 8)
    on the CPU, 120 s and one on an accelerator."""
    import torch

    if batch_seconds is None:
        batch_seconds = CPU_BATCH_SECONDS if on_cpu else ACCELERATOR_BATCH_SECONDS
    if encoders is None:
        encoders = min(torch.get_num_threads(), 8) if on_cpu else 1
    return batch_seconds, max(1, encoders)


Loaded = tuple[Job, np.ndarray | None, float, str]  # (job, audio or None, seconds, error message)


def _load(job: Job, sample_rate: int) -> Loaded:
    if job.seconds > WINDOW_SECONDS:
        return job, None, job.seconds, ""  # too long to hold: the encoder streams it (_encode_and_write)
    try:
        wav, seconds = load_audio(job.source, sample_rate)
        return job, wav, seconds, ""
    except AudioError as e:
        return job, None, job.seconds, str(e).removeprefix(f"{job.source}: ")


def _encode_and_write(loaded: list[Loaded], codec: Codec) -> tuple[list[float], dict[str, str]]:
    """Encode one batch and write its npz files; the audio seconds of each file written, and the failures
    of the long files it streams (those come without audio and without an error)."""
    failures, written = {}, []
    for job, wav, _, error in loaded:
        if wav is None and not error:
            try:
                item = quantize_file(job.source, codec)
            except AudioError as e:
                failures[str(job.source)] = str(e).removeprefix(f"{job.source}: ")
                continue
            formats.write_codes(job.out, item)
            written.append(item.seconds)
    return written + _encode_batch([(job, wav, sec) for job, wav, sec, _ in loaded if wav is not None], codec), failures


def _encode_batch(good: list[tuple[Job, np.ndarray, float]], codec: Codec) -> list[float]:
    """Encode loaded audio in one batch and write its npz files; the audio seconds of each."""
    if not good:
        return []
    codes = codec.encode([wav for _, wav, _ in good])
    for (job, wav, seconds), c in zip(good, codes, strict=True):
        expected = frames_for(len(wav), codec.sample_rate, codec.frame_rate)
        assert c.shape == (codec.n_codebooks, expected), (c.shape, expected)
        formats.write_codes(job.out, formats.Codes(
            codes=np.asarray(c, dtype=np.int16), sample_rate=codec.sample_rate,
            frame_rate=codec.frame_rate, codec=codec.spec, source=str(job.source.resolve()), seconds=seconds,
        ))
    return [seconds for _, _, seconds in good]


def _encode_batches(batches: list[list[Job]], codec: Codec, workers: int, n_encoders: int, report: FolderReport,
                    on_progress: Callable[[float], None] | None) -> None:
    """Load batches on ``workers`` threads, n_encoders + 1 batches ahead, while ``n_encoders`` threads encode
    and write them; counts go to ``report``."""

    def finish(batch: Future, loaded_seconds: float) -> None:
        written, failures = batch.result()
        report.failures.update(failures)
        report.written += len(written)
        report.audio_seconds += sum(written)
        if on_progress:
            on_progress(loaded_seconds)

    depth = n_encoders + 1  # batches loading ahead of the encoders
    with ThreadPoolExecutor(max(1, workers)) as loaders, ThreadPoolExecutor(n_encoders) as encoder_pool:
        def load_batch(batch: list[Job]) -> list[Future]:
            return [loaders.submit(_load, job, codec.sample_rate) for job in batch]

        loading = [load_batch(b) for b in batches[:depth]]
        encoding: deque[tuple[Future, float]] = deque()
        try:
            for k in range(len(batches)):
                loaded = [f.result() for f in loading[k]]
                if k + depth < len(batches):
                    loading.append(load_batch(batches[k + depth]))
                loading[k] = []  # let the audio go once it is encoded
                for job, _, _, error in loaded:
                    if error:
                        report.failures[str(job.source)] = error
                if len(encoding) >= n_encoders:
                    finish(*encoding.popleft())
                encoding.append((encoder_pool.submit(_encode_and_write, loaded, codec),
                                 sum(s for _, _, s, _ in loaded)))
            while encoding:
                finish(*encoding.popleft())
        except BaseException:
            # An encoder error or Ctrl-C: drop the queued loads and batches instead of waiting for them
            # (what was written is whole: writes are atomic; a rerun goes on from there).
            for future in [f for batch in loading for f in batch] + [f for f, _ in encoding]:
                future.cancel()
            raise


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
    """One audio file (or its bytes) -> Codes, read and encoded in windows (see ``encode_stream``)."""
    stream = MonoStream(source, codec.sample_rate, name=name)
    codes = encode_stream(stream, codec)
    origin = "" if isinstance(source, bytes) else str(Path(source).resolve())
    return formats.Codes(codes=np.asarray(codes, dtype=np.int16), sample_rate=codec.sample_rate,
                         frame_rate=codec.frame_rate, codec=codec.spec, source=origin, seconds=stream.seconds)


def encode_stream(stream: MonoStream, codec: Codec, window_seconds: float | None = None,
                  context_seconds: float | None = None) -> np.ndarray:
    """Codes (K, T) of a whole file, encoded a window at a time as its blocks arrive.

    Like ``load_audio``, audio peaking above full scale is divided by its peak: that is known only at the
    end, so such a file (rare: float files, or resampling overshoot) is read and encoded a second time.
    A file no longer than a window plus its context is one ``codec.encode`` call on the same samples
    ``load_audio`` gives, so its codes are those of the batched path.
    """
    window_seconds = WINDOW_SECONDS if window_seconds is None else window_seconds
    context_seconds = CONTEXT_SECONDS if context_seconds is None else context_seconds
    codes, peak = _encode_in_windows(stream, codec, 1.0, window_seconds, context_seconds)
    if peak > 1.0:
        codes, _ = _encode_in_windows(stream, codec, peak, window_seconds, context_seconds)
    return codes


def _samples_per_frame(codec: Codec) -> int:
    hop = codec.sample_rate / codec.frame_rate
    if hop != int(hop):
        raise ValleError(f"{codec.spec.get('name')}: {hop} samples per code frame; windows need a whole number")
    return int(hop)


def _encode_in_windows(blocks: Iterable[np.ndarray], codec: Codec, divisor: float, window_seconds: float,
                       context_seconds: float) -> tuple[np.ndarray, float]:
    """Codes (K, T) of the blocks joined (each divided by ``divisor``) and their peak |sample| (undivided).

    Window w codes frames [w * W, (w + 1) * W); the encoder sees its audio plus ``context`` samples either
    side (less at the ends of the file), and the codes of the context are dropped. Only the audio of the
    current window and its context is held."""
    hop = _samples_per_frame(codec)
    window = max(1, round(window_seconds * codec.frame_rate)) * hop
    context = int(np.ceil(context_seconds * codec.frame_rate)) * hop
    pending, offset, done = np.zeros(0, np.float32), 0, 0  # audio from sample `offset` on; codes out below `done`
    fresh, end = [], 0  # blocks not yet joined to pending; samples read so far
    parts, peak = [], 0.0
    for block in blocks:
        peak = max(peak, float(np.abs(block).max(initial=0.0)))
        fresh.append(block if divisor == 1.0 else block / divisor)
        end += len(block)
        if end < done + window + context:
            continue
        pending, fresh = np.concatenate([pending, *fresh]), []
        while offset + len(pending) >= done + window + context:
            parts.append(_window_codes(codec, pending[: done - offset + window + context], done - offset, hop,
                                       window // hop))
            done += window
            pending, offset = pending[done - context - offset:], done - context
    pending = np.concatenate([pending, *fresh])
    parts.append(_window_codes(codec, pending, done - offset, hop, None))  # the rest, to the end of the file
    return np.concatenate(parts, axis=1), peak


def _window_codes(codec: Codec, audio: np.ndarray, start: int, hop: int, frames: int | None) -> np.ndarray:
    """Codes of ``frames`` frames (all to the end when None) from sample ``start`` of ``audio``, whose
    samples before ``start`` and after those frames are context."""
    (codes,) = codec.encode([np.ascontiguousarray(audio)])
    first = start // hop
    return np.asarray(codes)[:, first: None if frames is None else first + frames]
