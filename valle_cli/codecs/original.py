"""Optional backends on the original ``encodec`` and ``descript-audio-codec`` (``dac``) packages.

Both packages import torchaudio, so they only work where a torchaudio build matching the installed
torch exists; ``load_codec`` always uses the transformers models (``valle_cli.codecs.hf``). This
module offers, where the packages import:

* ``original_encodec(...)`` / ``original_dac(...)``: codecs with the same protocol, batching and
  spec identity as the transformers ones (``spec["backend"]`` says which produced the codes);
* ``encodec_weights_to_original`` / ``encodec_weights_from_original`` and ``dac_weights_to_original``:
  copy weights between a transformers model and an original-package model (weight norm folded and
  unfolded), so that the same weights can be compared on both implementations;
* ``original_like(codec)``: an original-package codec carrying a transformers codec's weights.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import torch

from valle_cli.codecs.hf import (
    DAC_MODELS,
    ENCODEC_BANDWIDTHS,
    ENCODEC_REPO,
    BatchedCodec,
    DacCodec,
    EncodecCodec,
    check_bandwidth,
    check_dac_model,
    dac_spec,
    encodec_spec,
)
from valle_cli.errors import CodecError

PACKAGES = {"encodec": "encodec", "dac": "descript-audio-codec"}


def package_problem(module: str) -> str | None:
    """None when the original package imports, else one line saying why it does not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or torchaudio failing to load its native library
        return (
            f"the {PACKAGES.get(module, module)!r} package does not import here ({type(exc).__name__}: {exc})"
        )
    return None


def _require(module: str) -> Any:
    problem = package_problem(module)
    if problem:
        raise CodecError(problem + "; the transformers implementation is used by default")
    return importlib.import_module(module)


# --------------------------------------------------------------------------------------------------
# Codecs on the original packages


class OriginalEncodecCodec(BatchedCodec):
    """EnCodec 24 kHz on the ``encodec`` package (``encodec.EncodecModel``)."""

    def __init__(
        self,
        model: Any,
        bandwidth: float = 6.0,
        device: str | torch.device = "cpu",
        *,
        extra_spec: dict[str, Any] | None = None,
        max_batch_seconds: float = 60.0,
        max_batch_items: int = 64,
    ):
        super().__init__(device, max_batch_seconds, max_batch_items)
        self.bandwidth = check_bandwidth(bandwidth)
        if int(model.sample_rate) != 24000 or int(model.channels) != 1 or model.segment is not None:
            raise CodecError("the original EnCodec model is not the mono 24 kHz model (encodec_model_24khz)")
        model.set_target_bandwidth(self.bandwidth)
        self.model = model.to(self.device).eval()
        self._set_layout(24000, model.encoder.hop_length, ENCODEC_BANDWIDTHS[self.bandwidth], model.quantizer.bins,
                         encodec_spec(ENCODEC_REPO, self.bandwidth, "encodec", extra_spec))  # hop 320

    def _encode_batch(self, audio: torch.Tensor) -> torch.Tensor:
        frames = self.model.encode(audio)  # [(codes (B, K, T), scale None)]: one frame, no segmenting
        return frames[0][0]

    def _decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode([(codes, None)])[:, 0]  # (B, 1, T * hop) -> (B, S)


class OriginalDacCodec(BatchedCodec):
    """DAC on the ``descript-audio-codec`` package (``dac.DAC``)."""

    def __init__(
        self,
        model: Any,
        model_name: str = "44khz",
        device: str | torch.device = "cpu",
        *,
        extra_spec: dict[str, Any] | None = None,
        max_batch_seconds: float = 30.0,
        max_batch_items: int = 64,
    ):
        super().__init__(device, max_batch_seconds, max_batch_items)
        self.model_name = check_dac_model(model_name)
        variant = DAC_MODELS[self.model_name]
        got = (int(model.sample_rate), tuple(model.encoder_rates), int(model.n_codebooks))
        want = (variant.sample_rate, variant.downsampling_ratios, variant.n_codebooks)
        if got != want:
            raise CodecError(f"original DAC model is {got}, expected {want} for {self.model_name}")
        self.model = model.to(self.device).eval()
        self._set_layout(variant.sample_rate, variant.hop_length, variant.n_codebooks, model.codebook_size,
                         dac_spec(self.model_name, "dac", extra_spec), pad_to_hop=True)  # as dac.DAC.preprocess

    def _encode_batch(self, audio: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(audio)  # 1.x: (z, codes, latents, losses...); 0.x: dict
        return out["codes"] if isinstance(out, dict) else out[1]  # (B, K, T)

    def _decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.model.quantizer.from_codes(codes)[0]  # (B, D, T)
        out = self.model.decode(z)
        audio = out["audio"] if isinstance(out, dict) else out  # (B, 1, S')
        return audio[:, 0]


def original_encodec(
    bandwidth: float = 6.0, device: str = "cpu", *, model: Any = None, pretrained: bool = True
) -> OriginalEncodecCodec:
    """EnCodec 24 kHz on the ``encodec`` package; its pretrained weights come through torch.hub."""
    bandwidth = check_bandwidth(bandwidth)
    if model is None:
        encodec = _require("encodec")
        try:
            model = encodec.EncodecModel.encodec_model_24khz(pretrained=pretrained)
        except Exception as exc:
            raise CodecError(f"cannot load the original EnCodec 24 kHz weights: {exc}") from None
    return OriginalEncodecCodec(model, bandwidth, device)


def original_dac_kwargs(model: str = "44khz") -> dict[str, Any]:
    """``dac.DAC(**kwargs)`` arguments of the published DAC models."""
    variant = DAC_MODELS[check_dac_model(model)]
    return {
        "encoder_dim": 64,
        "encoder_rates": list(variant.downsampling_ratios),
        "decoder_dim": 1536,
        "decoder_rates": list(reversed(variant.downsampling_ratios)),
        "n_codebooks": variant.n_codebooks,
        "codebook_size": 1024,
        "codebook_dim": 8,
        "sample_rate": variant.sample_rate,
    }


def original_dac(
    model: str = "44khz", device: str = "cpu", *, net: Any = None, pretrained: bool = True
) -> OriginalDacCodec:
    """DAC on the ``descript-audio-codec`` package; pretrained weights via ``dac.utils.download``."""
    name = check_dac_model(model)
    if net is None:
        dac = _require("dac")
        try:
            if pretrained:
                net = dac.DAC.load(dac.utils.download(model_type=name))
            else:
                net = dac.DAC(**original_dac_kwargs(name))
        except Exception as exc:
            raise CodecError(f"cannot load the original DAC {name} weights: {exc}") from None
    return OriginalDacCodec(net, name, device)


def original_like(codec: EncodecCodec | DacCodec, device: str | None = None) -> BatchedCodec:
    """An original-package codec with the same settings and weights as a transformers codec."""
    dev = str(device or codec.device)
    extra = {k: v for k, v in codec.spec.items() if k not in {"name", "model", "bandwidth", "backend"}}
    if isinstance(codec, EncodecCodec):
        model = _require("encodec").EncodecModel.encodec_model_24khz(pretrained=False)
        encodec_weights_to_original(codec.model, model)
        return OriginalEncodecCodec(model, codec.bandwidth, dev, extra_spec=extra)
    if isinstance(codec, DacCodec):
        net = _require("dac").DAC(**original_dac_kwargs(codec.model_name))
        dac_weights_to_original(codec.model, net)
        return OriginalDacCodec(net, codec.model_name, dev, extra_spec=extra)
    raise CodecError(f"no original-package backend for {type(codec).__name__}")


# --------------------------------------------------------------------------------------------------
# Weight copying


def encodec_key_to_hf(key: str) -> str:
    """``encodec`` state-dict name (weight norm folded) -> transformers ``EncodecModel`` name."""
    key = re.sub(r"^(encoder|decoder)\.model\.", r"\1.layers.", key)
    key = key.replace(".conv.conv.", ".conv.").replace(".convtr.convtr.", ".conv.")
    key = key.replace(".conv.norm.", ".norm.").replace(".convtr.norm.", ".norm.")  # time_group_norm models
    return key.replace("quantizer.vq.layers.", "quantizer.layers.").replace("._codebook.", ".codebook.")


_RES_PARTS = ("snake1", "conv1", "snake2", "conv2")  # a DAC residual unit: Snake, WNConv, Snake, WNConv


def dac_key_to_hf(key: str, n_blocks: int = 4) -> str:
    """``dac`` state-dict name (weight norm folded) -> transformers ``DacModel`` name."""
    m = re.match(r"^encoder\.block\.(\d+)\.(.*)$", key)
    if m:
        n, rest = int(m.group(1)), m.group(2)
        if n in (0, n_blocks + 1, n_blocks + 2):
            return _dac_end_layer("encoder", n, rest, n_blocks)
        r = re.match(r"^block\.([012])\.block\.([0-3])\.(.*)$", rest)  # residual units 1..3
        if r:
            unit, part = int(r.group(1)) + 1, _RES_PARTS[int(r.group(2))]
            return f"encoder.block.{n - 1}.res_unit{unit}.{part}.{r.group(3)}"
        r = re.match(r"^block\.([34])\.(.*)$", rest)  # Snake, strided WNConv
        if r:
            return f"encoder.block.{n - 1}.{'snake1' if r.group(1) == '3' else 'conv1'}.{r.group(2)}"
    m = re.match(r"^decoder\.model\.(\d+)\.(.*)$", key)
    if m:
        n, rest = int(m.group(1)), m.group(2)
        if n in (0, n_blocks + 1, n_blocks + 2):
            return _dac_end_layer("decoder", n, rest, n_blocks)
        r = re.match(r"^block\.([01])\.(.*)$", rest)  # Snake, WNConvTranspose
        if r:
            return f"decoder.block.{n - 1}.{'snake1' if r.group(1) == '0' else 'conv_t1'}.{r.group(2)}"
        r = re.match(r"^block\.([234])\.block\.([0-3])\.(.*)$", rest)  # residual units 1..3
        if r:
            unit, part = int(r.group(1)) - 1, _RES_PARTS[int(r.group(2))]
            return f"decoder.block.{n - 1}.res_unit{unit}.{part}.{r.group(3)}"
    return key  # quantizer.quantizers.i.{in_proj,out_proj,codebook}.* are named alike


def _dac_end_layer(side: str, n: int, rest: str, n_blocks: int) -> str:
    """The layers around an encoder's / decoder's blocks: ``dac`` numbers them 0 (the first conv), n_blocks + 1
    (the last Snake) and n_blocks + 2 (the last conv); transformers names them conv1, snake1 and conv2."""
    name = {0: "conv1", n_blocks + 1: "snake1", n_blocks + 2: "conv2"}[n]
    return f"{side}.{name}.{rest}"


def encodec_weights_to_original(hf_model: torch.nn.Module, orig_model: torch.nn.Module) -> None:
    """Copy a transformers ``EncodecModel``'s weights into an ``encodec.EncodecModel`` (in place)."""
    _copy_weights(hf_model, orig_model, encodec_key_to_hf, to_original=True)


def encodec_weights_from_original(orig_model: torch.nn.Module, hf_model: torch.nn.Module) -> None:
    """Copy an ``encodec.EncodecModel``'s weights into a transformers ``EncodecModel`` (in place)."""
    _copy_weights(hf_model, orig_model, encodec_key_to_hf, to_original=False)


def dac_weights_to_original(hf_model: torch.nn.Module, orig_model: torch.nn.Module) -> None:
    """Copy a transformers ``DacModel``'s weights into a ``dac.DAC`` (in place)."""
    n = len(hf_model.config.downsampling_ratios)
    _copy_weights(hf_model, orig_model, lambda k: dac_key_to_hf(k, n), to_original=True)


# Weight-norm parameter names: old-style torch.nn.utils.weight_norm and the parametrization API.
_WN_PAIRS = (
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every weight-normed ``(g, v)`` pair folded into the effective ``.weight``."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in _WN_PAIRS:
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                out[base + ".weight"] = torch._weight_norm(state[base + v_suffix], value, 0)
                break
            if key.endswith(v_suffix):
                break
        else:
            out[key] = value
    return out


def load_plain_state(model: torch.nn.Module, plain: dict[str, torch.Tensor]) -> None:
    """Load effective weights into ``model``, unfolding them into its weight-norm ``(g, v)`` pairs."""
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, current in target.items():
        for g_suffix, v_suffix in _WN_PAIRS:
            if key.endswith(g_suffix) or key.endswith(v_suffix):
                is_g = key.endswith(g_suffix)
                weight = plain[key[: -len(g_suffix if is_g else v_suffix)] + ".weight"]
                new[key] = torch.norm_except_dim(weight, 2, 0) if is_g else weight
                break
        else:
            if key not in plain:
                raise CodecError(f"no weight for {key} in the source model")
            new[key] = plain[key]
        if new[key].shape != current.shape:
            raise CodecError(f"weight {key}: shape {tuple(new[key].shape)} != {tuple(current.shape)}")
    model.load_state_dict({k: v.detach().clone().to(target[k].dtype) for k, v in new.items()}, strict=True)


def _copy_weights(
    hf_model: torch.nn.Module, orig_model: torch.nn.Module, to_hf: Any, *, to_original: bool
) -> None:
    orig_plain = plain_state(orig_model)
    hf_plain = plain_state(hf_model)
    names = {k: to_hf(k) for k in orig_plain}  # original name -> transformers name
    missing = sorted(set(names.values()) ^ set(hf_plain))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CodecError(f"weight names do not correspond between the two models: {shown}")
    if to_original:
        load_plain_state(orig_model, {k: hf_plain[h] for k, h in names.items()})
    else:
        load_plain_state(hf_model, {h: orig_plain[k] for k, h in names.items()})
