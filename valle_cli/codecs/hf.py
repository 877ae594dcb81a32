"""EnCodec 24 kHz and DAC 44/24/16 kHz through ``transformers`` (``EncodecModel`` / ``DacModel``).

Both codecs share ``BatchedCodec``: validated inputs, batches sorted by length and cut to a bounded
number of padded samples, one forward per batch under ``torch.inference_mode``, each item trimmed
back to its own length. Pretrained weights come from the Hugging Face cache (or the hub, once);
``EncodecCodec.random`` / ``DacCodec.random`` build the same architectures with seeded random
weights, for tests and for machines without the weights.

Frame counts follow ``valle_cli.codecs.frames_for``: T = ceil(S / hop). DAC input is zero-padded to
a multiple of the hop, as the original ``dac`` package does, so one second at 44.1 kHz gives 87
frames (``DacModel`` on unpadded audio would give 86).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from valle_cli.codecs import check_codes, check_wav, describe, frames_for
from valle_cli.errors import CodecError

if TYPE_CHECKING:
    from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel

ENCODEC_REPO = "facebook/encodec_24khz"
# kbps -> codebooks: 1024-entry codebooks (10 bits) at 75 frames/s are 0.75 kbps each.
ENCODEC_BANDWIDTHS: dict[float, int] = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}

# How to find out about the built-in alternative, appended to every "weights unavailable" message.
_BUILTIN_HINT = "or use the built-in codec (valle quantize without --codec)"
_HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


@dataclass(frozen=True)
class DacVariant:
    """One published DAC checkpoint (values from its config.json on the hub)."""

    repo: str
    sample_rate: int
    downsampling_ratios: tuple[int, ...]
    n_codebooks: int

    @property
    def hop_length(self) -> int:
        return int(np.prod(self.downsampling_ratios))


DAC_MODELS: dict[str, DacVariant] = {
    "44khz": DacVariant("descript/dac_44khz", 44100, (2, 4, 8, 8), 9),  # hop 512, ~86.1 frames/s
    "24khz": DacVariant("descript/dac_24khz", 24000, (2, 4, 5, 8), 32),  # hop 320, 75 frames/s
    "16khz": DacVariant("descript/dac_16khz", 16000, (2, 4, 5, 8), 12),  # hop 320, 50 frames/s
}


# --------------------------------------------------------------------------------------------------
# Name checks and configs


def check_bandwidth(bandwidth: float | str) -> float:
    """EnCodec bandwidth in kbps as one of the allowed floats, or CodecError listing them."""
    allowed = ", ".join(f"{b:g}" for b in ENCODEC_BANDWIDTHS)
    try:
        value = float(bandwidth)
    except (TypeError, ValueError):
        raise CodecError(
            f"EnCodec bandwidth {bandwidth!r} is not a number; use one of {allowed} kbps"
        ) from None
    if value not in ENCODEC_BANDWIDTHS:
        raise CodecError(f"EnCodec bandwidth {value:g} kbps is not supported; use one of {allowed} kbps")
    return value


def check_dac_model(model: str) -> str:
    """Normalised DAC model name ("44khz" | "24khz" | "16khz"), or CodecError listing them."""
    name = str(model).strip().lower()
    if name not in DAC_MODELS:
        raise CodecError(f"unknown DAC model {model!r}; use one of {', '.join(DAC_MODELS)}")
    return name


def encodec_config() -> EncodecConfig:
    """The config of facebook/encodec_24khz, written out (it equals transformers' defaults)."""
    from transformers import EncodecConfig

    return EncodecConfig(
        target_bandwidths=list(ENCODEC_BANDWIDTHS),
        sampling_rate=24000,
        audio_channels=1,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
        hidden_size=128,
        num_filters=32,
        num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 2],
        norm_type="weight_norm",
        kernel_size=7,
        last_kernel_size=7,
        residual_kernel_size=3,
        dilation_growth_rate=2,
        use_causal_conv=True,
        pad_mode="reflect",
        compress=2,
        num_lstm_layers=2,
        trim_right_ratio=1.0,
        codebook_size=1024,
        codebook_dim=128,
        use_conv_shortcut=True,
    )


def dac_config(model: str = "44khz") -> DacConfig:
    """The config of descript/dac_<model>: encoder 64, decoder 1536, 1024 x 8-dim codebooks."""
    from transformers import DacConfig

    variant = DAC_MODELS[check_dac_model(model)]
    return DacConfig(
        encoder_hidden_size=64,
        downsampling_ratios=list(variant.downsampling_ratios),
        decoder_hidden_size=1536,
        n_codebooks=variant.n_codebooks,
        codebook_size=1024,
        codebook_dim=8,
        quantizer_dropout=0.0,
        sampling_rate=variant.sample_rate,
    )


def encodec_spec(model_id: str, bandwidth: float, backend: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The spec of EnCodec codes; ``backend`` names the implementation that made them."""
    return {"name": "encodec", "model": model_id, "bandwidth": bandwidth, **(extra or {}), "backend": backend}


def dac_spec(model_name: str, backend: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The spec of DAC codes; ``backend`` names the implementation that made them."""
    return {"name": "dac", "model": model_name, **(extra or {}), "backend": backend}


# --------------------------------------------------------------------------------------------------
# Shared batching


class BatchedCodec:
    """Batching, validation and trimming shared by the neural codecs.

    Subclasses set the protocol attributes plus ``hop_length`` and implement ``_encode_batch`` and
    ``_decode_batch`` on padded tensors.
    """

    spec: dict[str, Any]
    sample_rate: int
    frame_rate: float
    n_codebooks: int
    codebook_size: int
    hop_length: int  # samples per code frame
    device: torch.device
    # Encoder input is zero-padded to a multiple of this many samples (DAC: the hop).
    pad_multiple: int = 1

    def __init__(self, device: str | torch.device, max_batch_seconds: float, max_batch_items: int):
        self.device = _torch_device(device)
        self.max_batch_seconds = float(max_batch_seconds)
        self.max_batch_items = int(max_batch_items)

    # -- subclass hooks
    def _encode_batch(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 1, S) float32 on device -> (B, K, T >= ceil(S / hop)) int."""
        raise NotImplementedError

    def _decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K, T) int64 on device -> (B, S') float audio, S' close to T * hop."""
        raise NotImplementedError

    # -- protocol
    def encode(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch of mono float32 (S_i,) at sample_rate -> list of int64 (K, T_i), T_i = frames_for(S_i)."""
        items = [check_wav(w, i) for i, w in enumerate(wavs)]
        out: list[np.ndarray | None] = [None] * len(items)
        for idx in self._batches([len(w) for w in items]):
            lengths = [len(items[i]) for i in idx]
            n = _round_up(max(lengths), self.pad_multiple)
            batch = np.zeros((len(idx), 1, n), dtype=np.float32)  # (B, 1, S)
            for row, i in enumerate(idx):
                batch[row, 0, : lengths[row]] = items[i]
            with torch.inference_mode():
                codes = self._encode_batch(torch.from_numpy(batch).to(self.device))  # (B, K, T)
                codes = codes.to("cpu", torch.int64).numpy()
            for row, i in enumerate(idx):
                t = frames_for(lengths[row], self.sample_rate, self.frame_rate)
                if codes.shape[-1] < t:  # pragma: no cover - guards a model/frame-count mismatch
                    got = codes.shape[-1]
                    raise CodecError(f"{describe(self.spec)}: got {got} frames for {lengths[row]} samples")
                out[i] = np.ascontiguousarray(codes[row, :, :t])  # (K, T_i)
        return out  # type: ignore[return-value]

    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch of int (K, T_i) -> list of mono float32 (T_i * hop,) at sample_rate."""
        items = [check_codes(c, i, self.spec, self.n_codebooks, self.codebook_size) for i, c in enumerate(codes)]
        out: list[np.ndarray | None] = [None] * len(items)
        for idx in self._batches([c.shape[1] * self.hop_length for c in items]):
            frames = [items[i].shape[1] for i in idx]
            batch = np.zeros((len(idx), self.n_codebooks, max(frames)), dtype=np.int64)  # (B, K, T)
            for row, i in enumerate(idx):
                batch[row, :, : frames[row]] = items[i]
            with torch.inference_mode():
                audio = self._decode_batch(torch.from_numpy(batch).to(self.device))  # (B, S')
                audio = audio.to("cpu", torch.float32).numpy()
            for row, i in enumerate(idx):
                n = frames[row] * self.hop_length
                wav = np.zeros(n, dtype=np.float32)  # (S_i,), zero tail where the model gives fewer
                m = min(n, audio.shape[-1])
                wav[:m] = audio[row, :m]
                out[i] = wav
        return out  # type: ignore[return-value]

    # -- helpers
    def _set_layout(self, sample_rate: int, hop_length: int, n_codebooks: int, codebook_size: int,
                    spec: dict[str, Any], *, pad_to_hop: bool = False) -> None:
        """The protocol attributes (the frame rate follows from the hop); ``pad_to_hop`` zero-pads encoder
        input to a multiple of the hop, as the original ``dac`` package does."""
        self.sample_rate, self.hop_length = int(sample_rate), int(hop_length)
        self.frame_rate = self.sample_rate / self.hop_length
        self.n_codebooks, self.codebook_size = int(n_codebooks), int(codebook_size)
        self.pad_multiple = self.hop_length if pad_to_hop else 1
        self.spec = spec

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices grouped longest first so that B * longest <= max_batch_seconds of audio."""
        budget = max(1, int(self.max_batch_seconds * self.sample_rate))
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batch: list[int] = []
        for i in order:
            longest = lengths[batch[0]] if batch else lengths[i]
            if batch and ((len(batch) + 1) * longest > budget or len(batch) >= self.max_batch_items):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _torch_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CodecError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CodecError(f"device {device!r} requested but CUDA is not available")
    return dev


# --------------------------------------------------------------------------------------------------
# EnCodec


class EncodecCodec(BatchedCodec):
    """EnCodec 24 kHz (causal, 75 frames/s, 1024-entry codebooks) at one fixed bandwidth."""

    def __init__(
        self,
        model: EncodecModel,
        bandwidth: float = 6.0,
        device: str | torch.device = "cpu",
        *,
        model_id: str = ENCODEC_REPO,
        backend: str = "transformers",
        extra_spec: dict[str, Any] | None = None,
        max_batch_seconds: float = 60.0,
        max_batch_items: int = 64,
    ):
        super().__init__(device, max_batch_seconds, max_batch_items)
        self.bandwidth = check_bandwidth(bandwidth)
        cfg = model.config
        if (cfg.sampling_rate, cfg.audio_channels, cfg.codebook_size) != (24000, 1, 1024) or cfg.normalize:
            raise CodecError(
                f"EnCodec model {model_id!r} is not the mono 24 kHz model this codec expects "
                f"(sampling_rate={cfg.sampling_rate}, audio_channels={cfg.audio_channels}, "
                f"codebook_size={cfg.codebook_size}, normalize={cfg.normalize})"
            )
        if self.bandwidth not in cfg.target_bandwidths:
            raise CodecError(f"EnCodec model {model_id!r} does not support {self.bandwidth:g} kbps")
        self.model = model.to(self.device).eval()
        self._set_layout(cfg.sampling_rate, np.prod(cfg.upsampling_ratios), ENCODEC_BANDWIDTHS[self.bandwidth],
                         cfg.codebook_size, encodec_spec(model_id, self.bandwidth, backend, extra_spec))

    @classmethod
    def random(
        cls, bandwidth: float = 6.0, seed: int = 0, device: str | torch.device = "cpu"
    ) -> EncodecCodec:
        """The facebook/encodec_24khz architecture with seeded random weights (no download).

        transformers initialises EnCodec codebooks to zeros; here they are filled from the encoder's own
        outputs on a seeded synthetic signal (as EnCodec's k-means init does), so codes vary with input.
        The spec gains ``random_seed``, so its codes never pass for the pretrained model's.
        """
        from transformers import EncodecModel

        bandwidth = check_bandwidth(bandwidth)
        with _seeded(seed):
            model = EncodecModel(encodec_config()).eval()
            _init_encodec_codebooks(model, seed)
        return cls(model, bandwidth, device, extra_spec={"random_seed": int(seed)})

    def at_bandwidth(self, bandwidth: float) -> EncodecCodec:
        """The same model (weights shared, not copied) at another bandwidth."""
        extra = {k: v for k, v in self.spec.items() if k not in {"name", "model", "bandwidth", "backend"}}
        return EncodecCodec(
            self.model,
            bandwidth,
            self.device,
            model_id=self.spec["model"],
            backend=self.spec["backend"],
            extra_spec=extra,
            max_batch_seconds=self.max_batch_seconds,
            max_batch_items=self.max_batch_items,
        )

    def _encode_batch(self, audio: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(audio, bandwidth=self.bandwidth, return_dict=True)
        return out.audio_codes[0]  # (1, B, K, T) -> (B, K, T); one chunk, 24 kHz model has no chunking

    def _decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(codes[None], [None], return_dict=True)
        return out.audio_values[:, 0]  # (B, 1, T * hop) -> (B, S)


def _synthetic_probe(seconds: float, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded mixture of gliding tones with slow tremolo, plus noise: (1, 1, S)."""
    n = int(seconds * sample_rate)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    sig = torch.zeros(n, dtype=torch.float64)
    for _ in range(6):
        f0, f1 = (torch.rand(2, generator=generator, dtype=torch.float64) * 2000 + 80).tolist()
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
        env = 0.5 + 0.5 * torch.sin(2 * np.pi * (0.5 + 3 * torch.rand(1, generator=generator).item()) * t)
        sig += 0.1 * env * torch.sin(phase)
    sig += 0.05 * torch.randn(n, generator=generator, dtype=torch.float64)
    return sig.to(torch.float32)[None, None]


@torch.no_grad()
def _init_encodec_codebooks(model: EncodecModel, seed: int, seconds: float = 1.0) -> None:
    """Fill each residual codebook with jittered residuals of the encoder output on a probe signal."""
    gen = torch.Generator().manual_seed(seed)
    probe = _synthetic_probe(seconds, model.config.sampling_rate, gen)
    residual = model.encoder(probe)[0].T  # (T, D)
    for layer in model.quantizer.layers:
        book = layer.codebook
        pick = torch.randint(0, residual.shape[0], (book.embed.shape[0],), generator=gen)
        spread = residual.std(dim=0, keepdim=True) + 1e-6  # (1, D)
        entries = residual[pick] + 0.5 * spread * torch.randn(book.embed.shape, generator=gen)  # (N, D)
        book.embed.copy_(entries)
        book.embed_avg.copy_(entries)
        book.cluster_size.fill_(1.0)
        residual = residual - book.decode(book.encode(residual[None]))[0]  # (T, D)


# --------------------------------------------------------------------------------------------------
# DAC


class DacCodec(BatchedCodec):
    """Descript Audio Codec 44.1 kHz (9 codebooks), 24 kHz (32) or 16 kHz (12); 1024 entries each."""

    def __init__(
        self,
        model: DacModel,
        model_name: str = "44khz",
        device: str | torch.device = "cpu",
        *,
        backend: str = "transformers",
        extra_spec: dict[str, Any] | None = None,
        max_batch_seconds: float = 30.0,
        max_batch_items: int = 64,
    ):
        super().__init__(device, max_batch_seconds, max_batch_items)
        self.model_name = check_dac_model(model_name)
        variant = DAC_MODELS[self.model_name]
        cfg = model.config
        # The sample rate comes from the table: some published config.json revisions said 16000 for all.
        got = (tuple(cfg.downsampling_ratios), int(cfg.n_codebooks), int(cfg.codebook_size))
        want = (variant.downsampling_ratios, variant.n_codebooks, 1024)
        if got != want:
            raise CodecError(
                f"DAC {self.model_name} weights do not match the published model: "
                f"(downsampling_ratios, n_codebooks, codebook_size) = {got}, expected {want}"
            )
        self.model = model.to(self.device).eval()
        self._set_layout(variant.sample_rate, variant.hop_length, variant.n_codebooks, 1024,
                         dac_spec(self.model_name, backend, extra_spec), pad_to_hop=True)

    @classmethod
    def random(cls, model: str = "44khz", seed: int = 0, device: str | torch.device = "cpu") -> DacCodec:
        """The descript/dac_<model> architecture with seeded random weights (no download)."""
        from transformers import DacModel

        name = check_dac_model(model)
        with _seeded(seed):
            net = DacModel(dac_config(name)).eval()
        return cls(net, name, device, extra_spec={"random_seed": int(seed)})

    def _encode_batch(self, audio: torch.Tensor) -> torch.Tensor:
        return self.model.encode(audio, return_dict=True).audio_codes  # (B, K, S / hop)

    def _decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        # (B, T * hop); 8 samples short for the 24/16 kHz models (stride-5 transposed convs)
        return self.model.decode(audio_codes=codes, return_dict=True).audio_values


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for model construction without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Pretrained weights


def load_encodec(bandwidth: float = 6.0, device: str = "cpu") -> EncodecCodec:
    """EnCodec 24 kHz with the pretrained facebook/encodec_24khz weights at ``bandwidth`` kbps."""
    bandwidth = check_bandwidth(bandwidth)
    _torch_device(device)
    model = fetch_pretrained("EncodecModel", ENCODEC_REPO, "EnCodec")
    return EncodecCodec(model, bandwidth, device)


def load_dac(model: str = "44khz", device: str = "cpu") -> DacCodec:
    """DAC with the pretrained descript/dac_<model> weights."""
    name = check_dac_model(model)
    _torch_device(device)
    net = fetch_pretrained("DacModel", DAC_MODELS[name].repo, "DAC")
    return DacCodec(net, name, device)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(v.strip().upper() in _TRUE for v in flags)


def hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint, no retries (the hub client's own retries take ~20 s)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True


def in_hf_cache(repo: str) -> bool:
    """Whether the repo's config.json is in the local Hugging Face cache (the weights may be missing)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def fetch_pretrained(class_name: str, repo: str, what: str) -> Any:
    """``transformers.<class_name>.from_pretrained(repo)``, from the local cache without touching the
    network when it is there, else from the hub after one quick reachability probe.

    Fails fast with one CodecError line naming the codec when neither works; transformers is not even
    imported when the weights are neither cached nor downloadable.
    """

    def unavailable() -> CodecError:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub cannot be reached"
        return CodecError(
            f"cannot load {what} weights {repo!r}: not in the local Hugging Face cache and {why}; "
            f"run once with network access to cache them, {_BUILTIN_HINT}"
        )

    cached = in_hf_cache(repo)
    if not cached and (hub_offline() or not hub_reachable()):
        raise unavailable()

    import transformers

    model_cls = getattr(transformers, class_name)
    with _quiet_transformers():
        if cached:
            try:
                return model_cls.from_pretrained(repo, local_files_only=True)
            except OSError:  # config cached but not the weights
                if hub_offline() or not hub_reachable():
                    raise unavailable() from None
            except Exception as exc:
                raise CodecError(f"cannot load cached {what} weights {repo!r}: {_one_line(exc)}") from None
        try:
            return model_cls.from_pretrained(repo)
        except Exception as exc:
            reason = _one_line(exc)
            raise CodecError(f"cannot load {what} weights {repo!r}: {reason}; {_BUILTIN_HINT}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's loading chatter (retry notices, init warnings)."""
    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
