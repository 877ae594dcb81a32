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
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from valle_cli.errors import CodecError, CodecMismatchError

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
