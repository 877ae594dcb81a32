"""Generation with a trained CodecLM: samplers, AR decoding with a KV cache, NAR passes, NAR-len demasking.

    codes = synthesize(model, requests, GenerateConfig(mode="ar+nar"), seed=0)   # list of (K, T)

AR + NAR (seed 000): level 0 autoregressively (prefill the prefix once, then one cached step per
frame until the stop token or ``max_frames``), then levels 1..K-1 in one bidirectional pass each
(greedy by default). NAR-len: the duration from the len head (or given), then ``steps`` rounds of
demasking level 0 on a cosine schedule: every round samples every masked frame, scores each
sample by its *unfiltered* probability, keeps the best and re-masks the rest; a kept token is
never re-masked (seed 000: without this the output stutters). CFG strength >= 2 there by default.

Samplers (``SamplingParams``, one per pass): repetition penalty over a window with decay, length
penalty on the stop token, min-p, top-k, top-p, temperature (<= 0: greedy), classifier-free
guidance ``c + s * (c - u)`` with std rescaling (s = 0 is plain sampling). Draws use the
exponential-race trick on a seeded generator: no host synchronisation per step (finished rows
are checked every ``sync_every`` steps).

Batches: rows of different lengths are right-padded; every row keeps its own positions and a
validity mask, so a batch gives each row exactly what it would get alone (greedy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from valle_cli.data import tasks
from valle_cli.errors import InputError
from valle_cli.model.masks import decode_step_mask, prefix_bidirectional_mask
from valle_cli.model.valle import Batch, CodecLM

MODES = ("ar+nar", "nar-len", "auto")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # <= 0: greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages codes seen in the last repetition_window frames
    repetition_window: int = 75
    repetition_decay: float = 0.0  # an occurrence d frames back counts (1 - decay) ** (d - 1)
    length_penalty: float = 0.0  # AR: stop logit -= length_penalty * log(1 + frames): > 0 favours longer
    cfg_strength: float = 0.0  # classifier-free guidance: c + s * (c - u); 0 = off
    cfg_rescale: float = 0.75  # blend towards the rescaled guided logits (std of c), 0 = plain CFG


@dataclass(frozen=True)
class GenerateConfig:
    mode: str = "auto"  # ar+nar | nar-len | auto (ar+nar when the model has the AR capability)
    ar: SamplingParams = SamplingParams(temperature=1.0, top_k=0, repetition_penalty=1.0)
    nar: SamplingParams = SamplingParams(temperature=0.0)
    demask: SamplingParams = SamplingParams(temperature=1.0, cfg_strength=2.5)  # NAR-len level 0
    max_frames: int = 2250  # AR stops here at the latest (30 s at 75 frames/s)
    min_frames: int = 1  # the stop token is banned before this many frames
    steps: int = 25  # NAR-len demasking rounds
    duration_padding: float = 1.0  # NAR-len: predicted length times this
    sync_every: int = 16  # AR: check for all-finished rows every N steps (one host sync)
    use_cache: bool = True  # False: recompute the whole sequence every AR step (the anchor's way; benchmarks)
    compile: bool = False  # torch.compile the one-frame AR step (native transformer with its static cache)


@dataclass
class Request:
    text: np.ndarray  # (L,) text token ids
    prompt: np.ndarray  # (K, P) prompt codes (P may be 0)
    lang: int = 0
    duration: int | None = None  # NAR-len: frames to generate (None: predicted)
    prompt_split: int = -1  # in-fill: the prompt is prefix (first prompt_split frames) + SEP + suffix


@dataclass
class GenerateStats:
    ar_frames: int = 0  # AR steps run (the longest row)
    ar_seconds: float = 0.0
    nar_seconds: float = 0.0
    demask_seconds: float = 0.0


# ----------------------------------------------------------------------------- samplers


def guide(cond: Tensor, uncond: Tensor | None, strength: float, rescale: float) -> Tensor:
    """Classifier-free guidance on (..., V) logits; strength 0 returns ``cond`` unchanged."""
    if uncond is None or strength == 0:
        return cond
    guided = cond + strength * (cond - uncond)
    if rescale > 0:  # keep the guided logits' spread at the conditional one's (avoids over-saturation)
        ratio = cond.std(-1, keepdim=True) / guided.std(-1, keepdim=True).clamp_min(1e-6)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return guided


def apply_repetition_penalty(logits: Tensor, history: Tensor | None, config: SamplingParams) -> Tensor:
    """logits (B, V); history (B, H) previous tokens, newest last (-1 = none)."""
    if config.repetition_penalty == 1.0 or history is None or history.shape[1] == 0:
        return logits
    recent = history[:, -config.repetition_window:]  # (B, W)
    w = recent.shape[1]
    age = torch.arange(w - 1, -1, -1, device=logits.device)  # 0 for the newest
    weight = (1.0 - config.repetition_decay) ** age.float()  # (W,)
    weight = weight.expand_as(recent) * (recent >= 0)
    counts = torch.zeros_like(logits).scatter_add_(1, recent.clamp_min(0), weight)  # (B, V)
    factor = config.repetition_penalty ** counts
    return torch.where(logits > 0, logits / factor, logits * factor)


def filter_logits(logits: Tensor, config: SamplingParams) -> Tensor:
    """min-p, top-k, top-p on (B, V) logits: filtered entries become -inf."""
    if config.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < config.min_p * probs.amax(-1, keepdim=True), -math.inf)
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


def draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """(B, V) -> (B,): argmax when temperature <= 0, else a sample (exponential race: no sync)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def sample_tokens(logits: Tensor, config: SamplingParams, generator: torch.Generator | None,
                  history: Tensor | None = None, uncond: Tensor | None = None, step: int = 0,
                  stop: int | None = None) -> Tensor:
    """The whole sampler for one step: CFG, repetition and length penalties, filters, draw. (B, V) -> (B,)."""
    logits = guide(logits.float(), None if uncond is None else uncond.float(), config.cfg_strength,
                   config.cfg_rescale)
    logits = apply_repetition_penalty(logits, history, config)
    if stop is not None and config.length_penalty:
        logits[:, stop] -= config.length_penalty * math.log1p(step)
    return draw(filter_logits(logits, config), config.temperature, generator)


# ----------------------------------------------------------------------------- sequence building


def _examples(requests: list[Request], kind: str, codes: list[np.ndarray], level: int, cfg: bool,
              masks: list[np.ndarray] | None = None) -> list[tasks.Example]:
    """Conditional rows, then (with cfg) the same rows without text and prompt: the null condition."""
    k = requests[0].prompt.shape[0]
    rows = []
    for variant in ((False, True) if cfg else (False,)):
        for i, r in enumerate(requests):
            rows.append(tasks.Example(
                text=np.zeros(0, np.int64) if variant else np.asarray(r.text, np.int64),
                prompt=np.zeros((k, 0), np.int64) if variant else np.asarray(r.prompt, np.int64),
                codes=codes[i], kind=kind, level=level, lang=r.lang, mask=None if masks is None else masks[i],
                prompt_split=-1 if variant else r.prompt_split))
    return rows


def _layout(model: CodecLM, examples: list[tasks.Example], device: str) -> Batch:
    sb = tasks.collate(examples, model.config.codebook_size, model.config.unified_positions)
    return Batch.from_numpy(sb, device)


# ----------------------------------------------------------------------------- AR (level 0)


def step_function(model: CodecLM, compile: bool) -> Callable[..., Tensor]:
    """``step(x (B, 1, D), positions (B, 1), mask (B, 1, 1, S), cache) -> hidden (B, 1, D)``, compiled once per model.

    Compiling needs the native backbone (its static cache is plain tensors; the HF caches are not
    traceable objects). The cache is an argument, not a closure, so its length stays symbolic and
    one compiled graph serves every step (dynamic shapes).
    """
    backbone = model.backbone

    def step(x: Tensor, positions: Tensor, mask: Tensor, cache: Any) -> Tensor:
        return backbone(x, positions, mask, cache=cache).hidden

    if not compile:
        return step
    if model.config.arch != "transformer":
        raise InputError(f"--compile needs --arch transformer (the {model.config.arch} backbone's cache is not "
                         "compilable); sample without --compile")
    compiled = getattr(model, "_compiled_step", None)
    if compiled is None:
        compiled = torch.compile(step, dynamic=True)
        model._compiled_step = compiled  # type: ignore[attr-defined]  # built once, reused by every call
    return compiled


@torch.no_grad()
def generate_ar(model: CodecLM, requests: list[Request], config: GenerateConfig,
                generator: torch.Generator | None = None, stats: GenerateStats | None = None) -> list[np.ndarray]:
    """Level-0 codes (T_i,) per request, up to (not including) the stop token."""
    import time

    start_time = time.perf_counter()
    device = next(model.parameters()).device
    k, stop = model.config.n_codebooks, model.config.codebook_size
    sampler = config.ar
    cfg = sampler.cfg_strength != 0
    n = len(requests)
    empty = [np.zeros((k, 0), np.int64)] * n
    batch = _layout(model, _examples(requests, "ar", empty, 0, cfg), str(device))
    b, s0 = batch.segment.shape
    valid_prefix = batch.segment != tasks.PAD
    last = valid_prefix.sum(1) - 1  # (B,) the start position of each row
    max_frames = config.max_frames
    total = s0 + max_frames
    valid = torch.zeros(b, total, dtype=torch.bool, device=device)
    valid[:, :s0] = valid_prefix
    next_position = batch.positions.gather(1, last[:, None]).squeeze(1) + 1  # (B,)
    x = model.embed(batch)  # (B, S0, D)
    backbone = model.backbone
    step_fn = step_function(model, config.compile and config.use_cache)
    mask = prefix_bidirectional_mask(valid_prefix, batch.bidir_start)
    # Rows without padding need no step mask: plain causal attention, which flash kernels can run.
    step_needs_mask = not bool(valid_prefix.all())
    cache_dtype = x.dtype  # under autocast the keys / values are made in the autocast dtype: store them so
    if torch.is_autocast_enabled(device.type):
        cache_dtype = torch.get_autocast_dtype(device.type)
    if config.use_cache:
        cache = backbone.new_cache(b, total, device, cache_dtype)
        hidden = backbone(x, batch.positions, mask, cache=cache).hidden
    else:
        cache = None
        hidden = backbone(x, batch.positions, mask).hidden
        seq_x, seq_pos = x, batch.positions
    h = hidden[torch.arange(b, device=device), last]  # (B, D)

    out = torch.full((n, max_frames), stop, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_frames):
        logits = model.head_ar(h).float()  # (B, V + 1)
        if t < config.min_frames:
            logits[:, stop] = -math.inf
        cond, uncond = (logits[:n], logits[n:]) if cfg else (logits, None)
        token = sample_tokens(cond, sampler, generator, history=out[:, max(0, t - sampler.repetition_window):t],
                              uncond=uncond, step=t, stop=stop)
        token = torch.where(done, stop, token)
        out[:, t] = token
        done |= token == stop
        steps = t + 1
        if (t + 1) % config.sync_every == 0 and bool(done.all()):
            break
        if t + 1 == max_frames:
            break
        fed = token.repeat(2) if cfg else token  # the null rows continue the same response
        x_step = model.resp_ar(fed)[:, None]  # (B, 1, D)
        valid[:, s0 + t] = True
        positions = next_position[:, None]
        if cache is not None:
            step_mask = decode_step_mask(valid[:, :s0 + t + 1], 1) if step_needs_mask else None
            h = step_fn(x_step, positions, step_mask, cache)[:, 0]
        else:  # recompute everything, as the anchor does
            seq_x, seq_pos = torch.cat([seq_x, x_step], 1), torch.cat([seq_pos, positions], 1)
            full_mask = prefix_bidirectional_mask(valid[:, :s0 + t + 1], torch.full_like(last, s0 + t + 1))
            h = backbone(seq_x, seq_pos, full_mask).hidden[:, -1]
        next_position = next_position + 1
    if stats is not None:
        stats.ar_frames += steps
        stats.ar_seconds += time.perf_counter() - start_time
    codes = out[:, :steps].cpu().numpy()
    results = []
    for row in codes:
        stops = np.flatnonzero(row == stop)
        results.append(row[:stops[0]] if len(stops) else row)
    return results


# ----------------------------------------------------------------------------- NAR (levels 1..K-1)


@torch.no_grad()
def generate_nar(model: CodecLM, requests: list[Request], level0: list[np.ndarray], config: GenerateConfig,
                 generator: torch.Generator | None = None, stats: GenerateStats | None = None) -> list[np.ndarray]:
    """(K, T_i) codes per request: level 0 given, each further level from the ones below in one pass."""
    import time

    start_time = time.perf_counter()
    device = str(next(model.parameters()).device)
    k = model.config.n_codebooks
    codes = []
    for row in level0:
        full = np.zeros((k, len(row)), np.int64)
        full[0] = row
        codes.append(full)
    sampler = config.nar
    cfg = sampler.cfg_strength != 0
    n = len(requests)
    for level in range(1, k):
        batch = _layout(model, _examples(requests, "nar", codes, level, cfg), device)
        hidden = model.hidden_states(batch)[0]
        head = model.head_nar[level - 1]
        for i in range(n):
            t = codes[i].shape[1]
            if t == 0:
                continue
            r0 = int(batch.bidir_start[i])
            logits = head(hidden[i, r0:r0 + t]).float()  # (T, V)
            uncond = None
            if cfg:
                u0 = int(batch.bidir_start[n + i])
                uncond = head(hidden[n + i, u0:u0 + t]).float()
            codes[i][level] = sample_tokens(logits, sampler, generator, uncond=uncond).cpu().numpy()
    if stats is not None:
        stats.nar_seconds += time.perf_counter() - start_time
    return codes


# ----------------------------------------------------------------------------- NAR-len (level 0 by demasking)


@torch.no_grad()
def predict_durations(model: CodecLM, requests: list[Request], config: GenerateConfig) -> list[int]:
    """Frames per request from the len head (read at the last prefix position of a NAR-len row)."""
    device = str(next(model.parameters()).device)
    k = model.config.n_codebooks
    empty = [np.zeros((k, 0), np.int64)] * len(requests)
    masks = [np.zeros(0, bool)] * len(requests)
    batch = _layout(model, _examples(requests, "mask", empty, 0, False, masks), device)
    hidden = model.hidden_states(batch)[0]
    last = (batch.segment != tasks.PAD).sum(1) - 1
    frames = model.predict_len(hidden[torch.arange(len(requests)), last]).cpu().numpy()
    padded = np.ceil(frames * config.duration_padding).astype(int)
    return [int(min(max(f, 1), config.max_frames)) for f in padded]


@torch.no_grad()
def generate_nar_len(model: CodecLM, requests: list[Request], config: GenerateConfig,
                     generator: torch.Generator | None = None, stats: GenerateStats | None = None,
                     on_step: Callable[[int, list[np.ndarray], list[np.ndarray]], None] | None = None
                     ) -> list[np.ndarray]:
    """Level-0 codes (T_i,) per request by iterative demasking; ``on_step(i, codes, masked)`` sees every round."""
    import time

    start_time = time.perf_counter()
    device = str(next(model.parameters()).device)
    k = model.config.n_codebooks
    predicted = None
    if any(r.duration is None for r in requests):
        predicted = predict_durations(model, requests, config)
    lengths = [r.duration if r.duration is not None else predicted[i] for i, r in enumerate(requests)]
    lengths = [int(min(max(t, 1), config.max_frames)) for t in lengths]
    sampler = config.demask
    n = len(requests)
    tokens = [np.zeros(t, np.int64) for t in lengths]
    masked = [np.ones(t, bool) for t in lengths]
    for step in range(config.steps):
        progress = (step + 1) / config.steps
        strength = sampler.cfg_strength * progress if sampler.cfg_strength else 0.0  # annealed guidance
        cfg = strength != 0
        step_sampler = replace(sampler, temperature=sampler.temperature * (1 - progress) if sampler.temperature > 0
                               else sampler.temperature, cfg_strength=strength)
        codes = []
        for i in range(n):
            c = np.zeros((k, lengths[i]), np.int64)
            c[0] = np.where(masked[i], 0, tokens[i])
            codes.append(c)
        batch = _layout(model, _examples(requests, "mask", codes, 0, cfg, masked), device)
        hidden = model.hidden_states(batch)[0]
        for i in range(n):
            t = lengths[i]
            r0 = int(batch.bidir_start[i])
            logits = model.head_mask(hidden[i, r0:r0 + t]).float()  # (T, V)
            uncond = None
            if cfg:
                u0 = int(batch.bidir_start[n + i])
                uncond = model.head_mask(hidden[n + i, u0:u0 + t]).float()
            guided = guide(logits, uncond, strength, sampler.cfg_rescale)  # once: for the draw and the scores
            sampled = sample_tokens(guided, replace(step_sampler, cfg_strength=0.0), generator)  # (T,)
            # scores from the unfiltered probabilities of what was drawn; kept tokens are never re-masked
            scores = guided.softmax(-1).gather(1, sampled[:, None]).squeeze(1).cpu().numpy()
            was_masked = masked[i]
            tokens[i] = np.where(was_masked, sampled.cpu().numpy(), tokens[i])
            scores = np.where(was_masked, scores, np.inf)
            n_masked = int(math.floor(t * math.cos(math.pi / 2 * progress)))
            n_masked = min(n_masked, int(was_masked.sum()) - 1) if step + 1 < config.steps else 0
            new_mask = np.zeros(t, bool)
            if n_masked > 0:
                new_mask[np.argsort(scores, kind="stable")[:n_masked]] = True
            masked[i] = new_mask
        if on_step is not None:
            on_step(step, [x.copy() for x in tokens], [m.copy() for m in masked])
    if stats is not None:
        stats.demask_seconds += time.perf_counter() - start_time
    return tokens


# ----------------------------------------------------------------------------- the whole thing


def resolve_mode(model: CodecLM, mode: str) -> str:
    caps = model.config.capabilities
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: expected {', '.join(MODES)}")
    if mode == "auto":
        mode = "ar+nar" if "ar" in caps else "nar-len"
    if mode == "ar+nar" and "ar" not in caps:
        raise InputError("this model was trained without the AR task: use --mode nar-len")
    if mode == "nar-len" and "len" not in caps:
        raise InputError("this model was trained without NAR-len: use --mode ar+nar")
    if model.config.n_codebooks > 1 and "nar" not in caps:
        raise InputError("this model was trained without the NAR task: it cannot make levels 1..K-1")
    return mode


def check_requests(model: CodecLM, requests: list[Request]) -> None:
    k, v = model.config.n_codebooks, model.config.codebook_size
    for i, r in enumerate(requests):
        if r.prompt.ndim != 2 or r.prompt.shape[0] != k:
            raise InputError(f"request {i}: prompt codes of shape {tuple(r.prompt.shape)}, the model expects {k} "
                             "codebooks")
        if r.prompt.size and (r.prompt.min() < 0 or r.prompt.max() >= v):
            raise InputError(f"request {i}: prompt codes outside 0..{v - 1}")
        if len(r.text) and (np.min(r.text) < 0 or np.max(r.text) >= model.config.text_vocab_size):
            raise InputError(f"request {i}: text token outside the model's {model.config.text_vocab_size} ids")
        if r.prompt_split > r.prompt.shape[1]:
            raise InputError(f"request {i}: prompt split {r.prompt_split} past the prompt's {r.prompt.shape[1]} frames")
        if not 0 <= r.lang < model.config.n_langs:
            raise InputError(f"request {i}: language id {r.lang} outside 0..{model.config.n_langs - 1}")


def synthesize(model: CodecLM, requests: list[Request], config: GenerateConfig = GenerateConfig(),
               seed: int | None = None, stats: GenerateStats | None = None) -> list[np.ndarray]:
    """(K, T_i) codes per request, by AR + NAR or NAR-len (+ NAR)."""
    if not requests:
        return []
    check_requests(model, requests)
    mode = resolve_mode(model, config.mode)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    if mode == "ar+nar":
        level0 = generate_ar(model, requests, config, generator, stats)
    else:
        level0 = generate_nar_len(model, requests, config, generator, stats)
    return generate_nar(model, requests, level0, config, generator, stats)


def synthesize_long(model: CodecLM, sentences: list[np.ndarray], prompt: np.ndarray, config: GenerateConfig,
                    context_history: int = 1, lang: int = 0, seed: int | None = None,
                    stats: GenerateStats | None = None) -> tuple[np.ndarray, list[int]]:
    """Long-form: one sentence at a time, each prompted by the reference and the last ``context_history``
    outputs (a rolling prompt). Returns the joined (K, T) codes and the frames of every segment."""
    segments: list[np.ndarray] = []
    for i, text in enumerate(sentences):
        history = segments[-context_history:] if context_history > 0 else []
        rolling = np.concatenate([prompt, *history], axis=1) if history else prompt
        (codes,) = synthesize(model, [Request(text=text, prompt=rolling, lang=lang)], config,
                              seed=None if seed is None else seed + i, stats=stats)
        segments.append(codes)
    k = prompt.shape[0]
    joined = np.concatenate(segments, axis=1) if segments else np.zeros((k, 0), np.int64)
    return joined, [s.shape[1] for s in segments]


# ----------------------------------------------------------------------------- continuation and in-fill (seed 003)


def continue_audio(model: CodecLM, prompt: np.ndarray, frames: int, config: GenerateConfig, rollouts: int = 1,
                   context_frames: int = 0, lang: int = 0, seed: int | None = None,
                   stats: GenerateStats | None = None) -> tuple[np.ndarray, list[int]]:
    """No text: ``rollouts`` times, continue the tape by ``frames`` frames from its last ``context_frames``.

    Returns the tape (the prompt, then every continuation; (K, P + rollouts * frames)) and the frames
    of each part. The stop token is banned until ``frames`` (a continuation has no natural end).
    """
    if frames < 1 or rollouts < 1:
        raise InputError("continuation needs frames >= 1 and rollouts >= 1")
    fixed = replace(config, max_frames=frames, min_frames=frames)
    tape, parts = np.asarray(prompt, np.int64), [int(prompt.shape[1])]
    for r in range(rollouts):
        context = tape[:, -context_frames:] if context_frames > 0 else tape
        request = Request(text=np.zeros(0, np.int64), prompt=context, lang=lang, duration=frames)
        (codes,) = synthesize(model, [request], fixed, seed=None if seed is None else seed + r, stats=stats)
        tape = np.concatenate([tape, codes], axis=1)
        parts.append(int(codes.shape[1]))
    return tape, parts


def infill(model: CodecLM, prefix: np.ndarray, suffix: np.ndarray, config: GenerateConfig,
           frames: int | None = None, lang: int = 0, seed: int | None = None,
           stats: GenerateStats | None = None) -> tuple[np.ndarray, list[int]]:
    """No text: the middle between ``prefix`` and ``suffix`` (prefix-suffix-middle order).

    AR + NAR ends the middle at the stop token (``frames`` forces a length, as NAR-len's duration).
    Returns prefix + middle + suffix and the frames of the three parts.
    """
    prompt = np.concatenate([prefix, suffix], axis=1).astype(np.int64)
    if frames is not None:
        config = replace(config, max_frames=frames, min_frames=frames)
    request = Request(text=np.zeros(0, np.int64), prompt=prompt, lang=lang, duration=frames,
                      prompt_split=int(prefix.shape[1]))
    (middle,) = synthesize(model, [request], config, seed=seed, stats=stats)
    return (np.concatenate([prefix, middle, suffix], axis=1),
            [int(prefix.shape[1]), int(middle.shape[1]), int(suffix.shape[1])])
