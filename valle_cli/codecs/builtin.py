"""The built-in offline codec: log-mel frames quantized by residual k-means, decoded by Griffin-Lim.

Nothing is downloaded: ``BuiltinCodec.fit`` learns everything from the user's own audio.

  encode  audio (S,) -> STFT magnitude -> log-mel (T, n_mels) -> per-bin standardisation
          -> residual k-means: stage k picks the nearest of ``codebook_size`` centres to what
             stages 0..k-1 left over -> codes (K, T)
  decode  codes -> sum of the chosen centres -> log-mel -> mel -> linear magnitude (pseudo-inverse
          of the mel filterbank) -> fast Griffin-Lim (momentum) from a seeded initial phase -> audio

Frame t covers the samples around t * hop_length; an utterance of S samples has ceil(S / hop) frames
and decodes to T * hop samples. Encoding and decoding are batched and do not depend on what else is
in the batch. The fitted codec is one safetensors file whose bytes are a function of its contents
only, so ``spec["sha256"]`` is the same before and after ``save``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valle_cli.codecs import check_codes, check_wav, frames_for
from valle_cli.errors import CodecError, FormatError
from valle_cli.formats import atomic_write_bytes

FORMAT_VERSION = 1
_TENSORS = ("codebooks", "mel_basis", "mean", "std")
_DTYPE_NAMES = {torch.float32: "F32", torch.int64: "I64"}


@dataclass(frozen=True)
class BuiltinCodecConfig:
    sample_rate: int = 24000  # Hz, audio in and out
    hop_length: int = 320  # samples per code frame (75 frames/s at 24 kHz)
    n_fft: int = 1280  # STFT size = window length (4 x hop)
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None  # None = sample_rate / 2
    log_floor: float = 1e-5  # mel magnitudes are clamped here before the log
    n_codebooks: int = 8  # K residual stages
    codebook_size: int = 1024  # centres per stage
    kmeans_iters: int = 15  # Lloyd iterations per stage after k-means++ seeding (more gain < 1 %)
    max_fit_frames: int = 400_000  # a seeded random subset of frames is used beyond this
    griffin_lim_iters: int = 32
    griffin_lim_momentum: float = 0.99  # 0 = plain Griffin-Lim
    phase_seed: int = 0  # seed of the initial phase: decoding is repeatable

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with sorted keys: equal contents give equal bytes (safetensors' own writer
    orders the metadata differently from run to run)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()  # safetensors is little-endian
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _deserialize(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        tensors = load(data)
    except Exception as exc:  # struct.error, JSONDecodeError, SafetensorError, ...
        raise FormatError(f"{name}: not a builtin codec file (truncated or not safetensors: {exc})") from None
    return tensors, header.get("__metadata__") or {}


class BuiltinCodec:
    """A fitted codec (satisfies ``valle_cli.codecs.Codec``). Build it with ``fit`` or ``load``."""

    def __init__(self, config: BuiltinCodecConfig, tensors: dict[str, torch.Tensor], device: str = "cpu",
                 path: Path | None = None):
        self.config = config
        self.device = torch.device(device)
        t = {k: tensors[k].to(self.device, torch.float32) for k in _TENSORS}
        self.codebooks = t["codebooks"]  # (K, C, n_mels), in standardised log-mel units
        self.mel_basis = t["mel_basis"]  # (n_mels, F), F = n_fft // 2 + 1
        self.mean, self.std = t["mean"], t["std"]  # (n_mels,) log-mel standardisation
        self.mel_pinv = torch.linalg.pinv(self.mel_basis.double()).float()  # (F, n_mels)
        self.window = torch.hann_window(config.n_fft, periodic=True, device=self.device)
        self.sample_rate = config.sample_rate
        self.frame_rate = config.frame_rate
        self.n_codebooks, self.codebook_size = int(self.codebooks.shape[0]), int(self.codebooks.shape[1])
        self._code_dtype = np.int16 if self.codebook_size <= np.iinfo(np.int16).max + 1 else np.int64
        self._bytes = self.to_bytes()
        self.spec: dict[str, Any] = {
            "name": "builtin", "sha256": hashlib.sha256(self._bytes).hexdigest(),
            "format_version": FORMAT_VERSION, "sample_rate": config.sample_rate,
            "frame_rate": self.frame_rate, "hop_length": config.hop_length, "n_fft": config.n_fft,
            "n_mels": config.n_mels, "n_codebooks": self.n_codebooks, "codebook_size": self.codebook_size,
        }
        if path is not None:
            self.spec["path"] = str(Path(path).resolve())

    # ------------------------------------------------------------------------- file

    def to_bytes(self) -> bytes:
        tensors = dict(codebooks=self.codebooks, mel_basis=self.mel_basis, mean=self.mean, std=self.std)
        meta = {"format_version": str(FORMAT_VERSION), "codec": "valle-builtin",
                "config": json.dumps(asdict(self.config), sort_keys=True)}
        return _serialize(tensors, meta)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_bytes(path, self._bytes)
        self.spec["path"] = str(Path(path).resolve())

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> BuiltinCodec:
        path = Path(path)
        if not path.is_file():
            raise CodecError(f"{path}: no such codec file (fit one with `valle quantize --fit-codec`)")
        tensors, meta = _deserialize(path.read_bytes(), str(path))
        if meta.get("codec") != "valle-builtin":
            raise FormatError(f"{path}: a safetensors file, but not a valle builtin codec")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise FormatError(f"{path}: builtin codec format version {meta.get('format_version')!r}, "
                              f"this valle reads version {FORMAT_VERSION}")
        try:
            config = BuiltinCodecConfig(**json.loads(meta["config"]))
            K, C, D = tensors["codebooks"].shape
            F = config.n_fft // 2 + 1
            assert (K, C, D) == (config.n_codebooks, config.codebook_size, config.n_mels)
            assert tensors["mel_basis"].shape == (D, F)
            assert tensors["mean"].shape == tensors["std"].shape == (D,)
        except (KeyError, TypeError, ValueError, AssertionError, json.JSONDecodeError):
            raise FormatError(f"{path}: builtin codec file with missing or inconsistent contents") from None
        return cls(config, tensors, device=device, path=path)

    # ------------------------------------------------------------------------- features

    def _stft(self, audio: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, F, L // hop + 1) complex
        c = self.config
        return torch.stft(audio, c.n_fft, c.hop_length, window=self.window, center=True,
                          pad_mode="constant", return_complex=True)

    def _overlap_add(self, frames: torch.Tensor, length: int) -> torch.Tensor:
        """(B, n_fft, T + 1) windowed frames -> (B, length) samples, frame t centred on t * hop."""
        c = self.config
        B, n, T1 = frames.shape
        r = -(-n // c.hop_length)  # frames overlapping any one sample
        pieces = torch.nn.functional.pad(frames, (0, 0, 0, r * c.hop_length - n))  # (B, r * hop, T + 1)
        pieces = pieces.transpose(1, 2).reshape(B, T1, r, c.hop_length)  # (B, T + 1, r, hop)
        out = frames.new_zeros(B, T1 + r - 1, c.hop_length)
        for j in range(r):
            out[:, j:j + T1] += pieces[:, :, j]
        return out.reshape(B, -1)[:, n // 2: n // 2 + length]

    def _istft(self, spec: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(B, F, T + 1) -> (B, L), the inverse of _stft when scale (B, L) = 1 / overlap-added window^2.
        With that scale it equals torch.istft(spec, n_fft, hop, window, center=True, length=L) to float
        rounding (tests/test_codec_builtin.py), about twice as fast (no envelope recomputation, no col2im)."""
        frames = torch.fft.irfft(spec, n=self.config.n_fft, dim=1) * self.window[:, None]  # (B, n_fft, T + 1)
        return self._overlap_add(frames, scale.shape[1]) * scale

    def _features(self, wavs: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        """Standardised log-mel (B, T_max, n_mels) of zero-padded audio, and each item's T_i."""
        wavs = [check_wav(w, i, empty_ok=True) for i, w in enumerate(wavs)]
        hop = self.config.hop_length
        lengths = [frames_for(len(w), self.sample_rate, self.frame_rate) for w in wavs]
        audio = torch.zeros(len(wavs), max(lengths) * hop)  # (B, T_max * hop)
        for i, w in enumerate(wavs):
            audio[i, : len(w)] = torch.from_numpy(w)
        # (B, F, T_max, 2) real and imaginary parts; the last frame is padding
        spec = torch.view_as_real(self._stft(audio.to(self.device))[..., :-1])
        mag = torch.hypot(spec[..., 0], spec[..., 1])  # (B, F, T_max): 3x faster than complex abs() on CPU
        mel = (self.mel_basis @ mag).clamp_min(self.config.log_floor).log()  # (B, n_mels, T_max)
        return (mel.transpose(1, 2) - self.mean) / self.std, lengths  # (B, T_max, n_mels)

    # ------------------------------------------------------------------------- encode / decode

    @torch.inference_mode()
    def encode(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(wavs) == 0:
            return []
        feats, lengths = self._features(wavs)  # (B, T, D)
        B, T, D = feats.shape
        codes = _residual_quantize(feats.reshape(B * T, D), self.codebooks).reshape(B, T, -1)  # (B, T, K)
        codes = codes.transpose(1, 2).cpu().numpy().astype(self._code_dtype)  # (B, K, T)
        return [codes[i, :, :n].copy() for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        items = [check_codes(c, i, self.spec, self.n_codebooks, self.codebook_size, empty_ok=True)
                 for i, c in enumerate(codes)]
        if not items:
            return []
        K, lengths = self.n_codebooks, [c.shape[1] for c in items]
        idx = torch.zeros(len(items), K, max(max(lengths), 1), dtype=torch.long)  # (B, K, T)
        for i, c in enumerate(items):
            idx[i, :, : c.shape[1]] = torch.from_numpy(c)
        idx = idx.to(self.device)
        feats = sum(self.codebooks[k][idx[:, k]] for k in range(K))  # (B, T, D)
        return self._synthesize(feats, lengths)

    def _synthesize(self, feats: torch.Tensor, lengths: list[int]) -> list[np.ndarray]:
        """Standardised log-mel (B, T, n_mels) -> audio (T_i * hop,) per item."""
        hop, T = self.config.hop_length, feats.shape[1]
        n_frames = torch.tensor(lengths, device=self.device)  # (B,)
        own = (torch.arange(T + 1, device=self.device) < n_frames[:, None]).unsqueeze(1)  # (B, 1, T + 1)
        mel = (feats * self.std + self.mean).exp().transpose(1, 2)  # (B, D, T)
        mag = (self.mel_pinv @ mel).clamp_min(0)  # (B, F, T) linear magnitude
        mag = torch.nn.functional.pad(mag, (0, 1)) * own  # (B, F, T + 1): silence past each item's end
        wav = self._griffin_lim(mag, n_frames)  # (B, T * hop)
        wav = wav.clamp(-1.0, 1.0).cpu().numpy().astype(np.float32)
        return [wav[i, : n * hop].copy() for i, n in enumerate(lengths)]

    def _griffin_lim(self, mag: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        """Fast Griffin-Lim (Perraudin et al. 2013): (B, F, T + 1) magnitudes -> (B, T * hop) audio.

        Item i owns frames 0..n_frames[i] (the last one silent, as _stft of its T_i * hop samples gives)
        and samples below n_frames[i] * hop. The initial phase of frame t comes from a fixed seeded table,
        the inverse STFT divides by the item's own window envelope, and samples past its end are zeroed
        after every inverse STFT: an item decodes the same alone or in any batch."""
        c = self.config
        B, F, T1 = mag.shape
        frames = (torch.arange(T1, device=self.device) <= n_frames[:, None]).unsqueeze(1)  # (B, 1, T + 1)
        samples = torch.arange((T1 - 1) * c.hop_length, device=self.device)
        mask = (samples < n_frames[:, None] * c.hop_length).float()  # (B, L)
        window2 = self.window.square()[None, :, None] * frames  # (B, n_fft, T + 1)
        scale = mask / self._overlap_add(window2, mask.shape[1]).clamp_min(1e-8)  # (B, L) 1/envelope, 0 past end
        gen = torch.Generator().manual_seed(c.phase_seed)
        phase = torch.rand(T1, F, generator=gen).T.to(self.device) * (2 * torch.pi)  # (F, T + 1)
        angles = torch.polar(torch.ones_like(phase), phase).expand(B, F, T1)  # (B, F, T + 1) unit complex
        prev = None
        for _ in range(c.griffin_lim_iters):
            proj = self._stft(self._istft(mag * angles, scale))  # the nearest consistent STFT
            # momentum: (1 + alpha) * proj - alpha * prev; sgn(z) = z / |z|
            angles = torch.sgn(proj if prev is None else torch.lerp(prev, proj, 1 + c.griffin_lim_momentum))
            prev = proj
        return self._istft(mag * angles, scale)

    # ------------------------------------------------------------------------- fitting

    @classmethod
    def fit(cls, wavs: Sequence[np.ndarray], config: BuiltinCodecConfig = BuiltinCodecConfig(), seed: int = 0,
            device: str = "cpu", progress: Callable[[str], None] | None = None) -> BuiltinCodec:
        """Fit the standardisation and the K codebooks on mono float32 audio at config.sample_rate."""
        import librosa

        say = progress or (lambda _msg: None)
        mel_basis = torch.from_numpy(librosa.filters.mel(
            sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels, fmin=config.fmin,
            fmax=config.fmax)).float()  # (n_mels, F)
        D = config.n_mels
        unit = {"mean": torch.zeros(D), "std": torch.ones(D), "mel_basis": mel_basis, "codebooks": torch.zeros(1, 1, D)}
        probe = cls(config, unit, device=device)  # computes raw (unstandardised) log-mel features
        order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))  # batch similar lengths together
        chunks = []
        for start in range(0, len(order), 32):
            feats, lengths = probe._features([wavs[i] for i in order[start:start + 32]])
            chunks += [f[:n] for f, n in zip(feats, lengths, strict=True)]
        x = torch.cat(chunks) if chunks else torch.zeros(0, D, device=probe.device)  # (N, D)
        if x.shape[0] < config.codebook_size:
            need = config.codebook_size / config.frame_rate
            have = x.shape[0] / config.frame_rate
            raise CodecError(f"too little audio to fit the builtin codec: {have:.1f} s, need at least {need:.1f} s "
                             f"({config.codebook_size} frames, one per codebook entry)")
        gen = torch.Generator(device=probe.device).manual_seed(seed)
        if x.shape[0] > config.max_fit_frames:
            pick = torch.randperm(x.shape[0], generator=gen, device=probe.device)[: config.max_fit_frames]
            x = x[pick.sort().values]
        # Per-bin standardisation; the floor keeps near-constant bins (e.g. above the band of upsampled
        # audio) from being blown up into noise that would waste codebook entries.
        mean, std = x.mean(0), x.std(0)  # (D,)
        std = std.clamp_min(0.2 * float(std.median()) + 1e-3)
        residual = (x - mean) / std  # (N, D) standardised
        total = residual.square().sum().item()
        books = []
        for k in range(config.n_codebooks):
            t0 = time.perf_counter()
            centres = _kmeans(residual, config.codebook_size, config.kmeans_iters, gen)  # (C, D)
            residual = residual - centres[_nearest(residual, centres)]
            books.append(centres)
            error = residual.square().sum().item() / total
            say(f"codebook {k + 1}/{config.n_codebooks}: relative error {error:.3f} ({time.perf_counter() - t0:.1f} s)")
        tensors = {"mean": mean, "std": std, "mel_basis": mel_basis, "codebooks": torch.stack(books)}
        return cls(config, tensors, device=device)


# ----------------------------------------------------------------------------- k-means


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index of the nearest centre for each row: (N, D), (C, D) -> (N,) long. Memory O(chunk * C): a
    1024 x 1024 block of distances stays in cache. min(1).indices is ~3x faster than argmin(1) on CPU."""
    c2 = centres.square().sum(1)  # (C,); ||x||^2 is the same for every centre
    out = [torch.addmm(c2, x[i:i + chunk], centres.T, alpha=-2).min(1).indices for i in range(0, x.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def _residual_quantize(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(N, D) features, (K, C, D) codebooks -> (N, K) codes; stage k quantizes what 0..k-1 left."""
    residual, codes = x, []
    for book in codebooks:
        idx = _nearest(residual, book)
        residual = residual - book[idx]
        codes.append(idx)
    return torch.stack(codes, 1)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on a random subset of 16 k rows (as good as all rows, and fast): each new
    centre is drawn with probability ~ squared distance to the nearest chosen one. (N, D) -> (k, D)."""
    x = x[torch.randperm(x.shape[0], generator=gen, device=x.device)[: 16 * k]]
    N = x.shape[0]
    x2 = x.square().sum(1)  # (N,)
    u = torch.rand(k, generator=gen, device=x.device, dtype=torch.float64)
    picks = [int(u[0] * N)]
    d2 = (x2 - 2 * (x @ x[picks[0]]) + x2[picks[0]]).clamp_min(0)  # (N,) to the nearest chosen centre
    for j in range(1, k):
        cdf = d2.double().cumsum(0)
        p = int(torch.searchsorted(cdf, u[j] * cdf[-1]).clamp_max(N - 1))
        picks.append(p)
        d2 = torch.minimum(d2, (x2 - 2 * (x @ x[p]) + x2[p]).clamp_min(0))
    return x[torch.tensor(picks, device=x.device)]


def _kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from k-means++ seeds; an emptied cluster takes the worst-fitted point."""
    centres = _kmeans_pp(x, k, gen)  # (k, D)
    for _ in range(iters):
        idx = _nearest(x, centres)  # (N,)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)  # (k, D)
        counts = torch.bincount(idx, minlength=k)  # (k,)
        centres = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            err = (x - centres[idx]).square().sum(1)  # (N,)
            centres[empty] = x[err.topk(empty.numel()).indices]
    return centres

