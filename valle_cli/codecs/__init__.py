"""Audio in and out: audio I/O, the codecs behind one small protocol, and ``quantize`` / ``decode``.

``audio`` reads any audio file into mono float32 at a codec's rate and writes wavs; ``builtin``
(an offline codec fitted on your audio), ``hf`` (EnCodec and DAC through transformers) and
``original`` (their original packages) implement the protocol below; ``quantize`` turns audio
files into codes files and ``decode`` turns codes back into audio. ``codecs/`` is the only code
that builds codec models. A codec turns mono float audio at its
``sample_rate`` into integer codes (K codebooks x T frames) and back. Every codes file records the
codec's ``spec`` (a JSON-able dict), and ``same_codec`` decides whether two specs are compatible.

Names accepted by ``load_codec``:
  builtin codec file   ``path/to/codec.safetensors`` (fitted by ``valle quantize --fit-codec``)
  encodec[:BANDWIDTH]  EnCodec 24 kHz, bandwidth 1.5|3|6|12|24 kbps (2..32 codebooks), default 6
  dac[:MODEL]          DAC 44khz (default) | 24khz | 16khz
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from valle_cli.errors import AudioError, CodecError, CodecMismatchError, FormatError

# Keys of a spec that locate a codec but do not change what its codes mean.
_LOCATION_KEYS = frozenset({"path", "backend"})


@runtime_checkable
class Codec(Protocol):
    spec: dict[str, Any]  # identity + settings, recorded in every codes file
    sample_rate: int  # audio rate in and out (Hz)
    frame_rate: float  # code frames per second
    n_codebooks: int  # K
    codebook_size: int  # entries per codebook

    def encode(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch of mono float32 (S_i,) at sample_rate -> list of int (K, T_i), T_i = ceil(S_i * fr / sr)."""
        ...

    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch of int (K, T_i) -> list of mono float32 (S_i,) at sample_rate."""
        ...


@dataclass
class FolderReport:
    """What ``quantize_folder`` / ``decode_folder`` did: files written and skipped, and the failures."""

    written: int = 0
    skipped: int = 0  # outputs that existed already
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # input file -> reason


def check_wav(wav: np.ndarray, i: int, *, empty_ok: bool = False) -> np.ndarray:
    """Audio item i of a batch as mono float32 (S,); AudioError for other shapes, NaN / inf, or no samples
    (unless ``empty_ok``: the builtin codec encodes nothing as one silent frame)."""
    arr = np.asarray(wav, dtype=np.float32)
    if arr.ndim != 1:
        raise AudioError(f"audio item {i}: expected mono samples (S,), got shape {arr.shape}")
    if arr.size == 0 and not empty_ok:
        raise AudioError(f"audio item {i} is empty")
    if not np.isfinite(arr).all():
        raise AudioError(f"audio item {i} has NaN or infinite samples")
    return arr


def check_codes(codes: np.ndarray, i: int, spec: dict[str, Any], n_codebooks: int, codebook_size: int, *,
                empty_ok: bool = False) -> np.ndarray:
    """Codes item i of a batch as int64 (K, T) for the codec of ``spec``; FormatError for another shape,
    dtype or value range, or no frames (unless ``empty_ok``), CodecMismatchError for another K."""
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise FormatError(f"codes item {i}: expected (codebooks, frames), got shape {arr.shape}")
    if arr.shape[0] != n_codebooks:
        raise CodecMismatchError(f"codes item {i} has {arr.shape[0]} codebooks, but {describe(spec)} uses "
                                 f"{n_codebooks}")
    if arr.shape[1] == 0 and not empty_ok:
        raise FormatError(f"codes item {i} has no frames")
    if not np.issubdtype(arr.dtype, np.integer):
        raise FormatError(f"codes item {i}: expected integer codes, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= codebook_size):
        raise FormatError(f"codes item {i} has values in [{int(arr.min())}, {int(arr.max())}], outside "
                          f"[0, {codebook_size - 1}] of {describe(spec)}")
    return arr.astype(np.int64, copy=False)


def codec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in _LOCATION_KEYS}


def same_codec(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return codec_identity(a) == codec_identity(b)


def describe(spec: dict[str, Any]) -> str:
    """Short human name of a codec spec, for messages."""
    name = spec.get("name", "?")
    if name == "builtin":
        return f"builtin codec {str(spec.get('sha256', ''))[:12]}"
    if name == "encodec":
        return f"encodec {spec.get('bandwidth')} kbps"
    if name == "dac":
        return f"dac {spec.get('model')}"
    return str(name)


def check_same_codec(expected: dict[str, Any], found: dict[str, Any], what: str) -> None:
    if not same_codec(expected, found):
        raise CodecMismatchError(
            f"{what}: made by {describe(found)}, but this step uses {describe(expected)}"
        )


def frames_for(n_samples: int, sample_rate: int, frame_rate: float) -> int:
    """Code frames a codec emits for n_samples of audio (ceil, at least one)."""
    return max(1, int(np.ceil(n_samples * frame_rate / sample_rate - 1e-9)))


def load_codec(name: str, device: str = "cpu") -> Codec:
    """Build a codec from a CLI name (see module doc) or a fitted builtin codec file."""
    name = str(name).strip()
    head, _, arg = name.partition(":")
    if head == "encodec":
        from valle_cli.codecs.hf import load_encodec

        return load_encodec(arg or 6.0, device=device)  # check_bandwidth parses and validates
    if head == "dac":
        from valle_cli.codecs.hf import load_dac

        return load_dac(arg or "44khz", device=device)
    path = Path(name)
    if path.suffix == ".safetensors" or path.exists():
        from valle_cli.codecs.builtin import BuiltinCodec

        return BuiltinCodec.load(path, device=device)
    raise CodecError(
        f"unknown codec {name!r}: use a fitted codec file (codec.safetensors), encodec[:1.5|3|6|12|24] "
        "or dac[:44khz|24khz|16khz]"
    )


def codec_from_spec(spec: dict[str, Any], device: str = "cpu", search: Sequence[Path] = ()) -> Codec:
    """Rebuild the codec that made a codes file. Builtin codecs are looked up by recorded path, then
    as ``codec.safetensors`` in the ``search`` folders, and must match the recorded hash."""
    name = spec.get("name")
    if name == "encodec":
        return load_codec(f"encodec:{spec['bandwidth']}", device)
    if name == "dac":
        return load_codec(f"dac:{spec['model']}", device)
    if name == "builtin":
        from valle_cli.codecs.builtin import BuiltinCodec

        candidates = [Path(spec["path"])] if spec.get("path") else []
        candidates += [Path(d) / "codec.safetensors" for d in search]
        for cand in candidates:
            if cand.is_file():
                codec = BuiltinCodec.load(cand, device=device)
                if same_codec(codec.spec, spec):
                    return codec
        raise CodecError(
            f"the builtin codec that made these codes ({describe(spec)}) was not found "
            f"(looked at {', '.join(str(c) for c in candidates) or 'nothing'}); name it with --codec PATH"
        )
    raise CodecError(f"codes record an unknown codec {name!r}")
