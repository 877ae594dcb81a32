"""Codes -> audio with the codec recorded in each codes file.

The codec is rebuilt from the spec stored in the npz (a builtin codec file is found by its
recorded path, or as ``codec.safetensors`` in the codes' folder or above); a codec named by the
user must be the one that made the codes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from valle_cli import formats
from valle_cli.codecs import Codec, FolderReport, check_same_codec, codec_from_spec, codec_identity
from valle_cli.codecs.audio import wav_bytes
from valle_cli.errors import InputError, PartialFailure, ValleError


class CodecCache:
    """Codecs by identity, built once per run; ``fixed`` (from --codec) must match every file."""

    def __init__(self, device: str, fixed: Codec | None = None):
        self.device, self.fixed, self._built = device, fixed, {}

    def for_codes(self, item: formats.Codes, where: Path | None, what: str) -> Codec:
        if self.fixed is not None:
            check_same_codec(self.fixed.spec, item.codec, what)
            return self.fixed
        key = json.dumps(codec_identity(item.codec), sort_keys=True)
        if key not in self._built:
            search = [where, *where.parents] if where is not None else []
            self._built[key] = codec_from_spec(item.codec, self.device, search=search[:4])
        return self._built[key]


def decode_item(item: formats.Codes, codec: Codec, name: str = "<codes>") -> np.ndarray:
    """(S,) audio of one codes item; codes of no frames are refused (a wav of no samples is no output)."""
    if item.codes.shape[1] == 0:
        raise InputError(f"{name}: no code frames (T = 0): nothing to decode")
    (wav,) = codec.decode([item.codes])
    return wav


def decode_folder(in_dir: Path, out_dir: Path, codecs: CodecCache, *, overwrite: bool = False,
                  on_progress: Callable[[int], None] | None = None) -> FolderReport:
    """Mirror every codes file under in_dir as a wav under out_dir; bad files are listed, not fatal.

    Output paths are the input paths relative to in_dir (rglob under in_dir: no '..' part), so every
    wav lands inside out_dir."""
    start = time.perf_counter()
    report = FolderReport()
    files = sorted(p for p in in_dir.rglob("*.npz") if not p.name.startswith("."))
    if not files:
        raise ValleError(f"{in_dir}: no codes files (.npz)")
    for path in files:
        out = out_dir / path.relative_to(in_dir).with_suffix(".wav")
        if out.exists() and not overwrite:
            report.skipped += 1
        else:
            try:
                item = formats.read_codes(path)
                codec = codecs.for_codes(item, path.parent, str(path))
                wav = decode_item(item, codec, str(path))
                formats.atomic_write_bytes(out, wav_bytes(wav, codec.sample_rate))
                report.written += 1
                report.audio_seconds += len(wav) / codec.sample_rate
            except ValleError as e:
                report.failures[str(path)] = str(e).removeprefix(f"{path}: ")
        if on_progress:
            on_progress(1)
    report.wall_seconds = time.perf_counter() - start
    if report.failures:
        raise PartialFailure(f"{len(report.failures)} codes file(s) could not be decoded "
                             f"({report.written} written, {report.skipped} already done)", report.failures)
    return report
