"""Generation with a trained CodecLM: samplers, AR decoding with a KV cache, NAR passes, NAR-len demasking.

    codes = synthesize(model, requests, GenerateConfig(mode="ar+nar"), seed=0)   # list of (K, T)

AR + NAR (the VALL-E paper; one unified model as in e-c-k-e-r/vall-e): level 0 autoregressively
(prefill the prefix once, then one cached step per frame until the stop token, ``max_frames`` or the
end of the model's ``max_positions``), then levels 1..K-1 in one bidirectional pass each (greedy by
default). NAR-len: the duration from the len head (or given; it must fit in the context), then
``steps`` rounds of demasking level 0 on a cosine schedule (MaskGIT): every round samples every
masked frame, scores each sample by its *unfiltered* probability, keeps the best and re-masks the
rest; a kept token is never re-masked (e-c-k-e-r/vall-e's NAR-len: without this the output
stutters). CFG strength >= 2 there by default.

Samplers (``SamplingParams``, one per pass; ``params.py`` holds the knobs): repetition penalty over
a window with decay, length penalty on the stop token, min-p, top-k, top-p, temperature (<= 0:
greedy), classifier-free guidance ``c + s * (c - u)`` with std rescaling (s = 0 is plain sampling).
Draws use the exponential-race trick on a seeded generator: no host synchronisation per step
(finished rows are checked every ``sync_every`` steps).

Batches: rows of different lengths are right-padded; every row keeps its own positions and a
validity mask, so a batch gives each row exactly what it would get alone (greedy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from valle_cli.data import tasks
from valle_cli.errors import InputError
from valle_cli.generation.params import MODES, GenerateConfig, SamplingParams
from valle_cli.model.config import ModelConfig
from valle_cli.model.masks import decode_step_mask, prefix_bidirectional_mask
from valle_cli.model.valle import Batch, CodecLM


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
    sb = tasks.collate(examples, model.config.codebook_size, model.config.unified_positions,
                       model.config.task_after_prompt)
    return Batch.from_numpy(sb, device)


def _response_logits(head: Callable[[Tensor], Tensor], hidden: Tensor, batch: Batch, row: int, n: int, frames: int,
                     cfg: bool, offsets: list[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """(T, V) logits of the response of ``row``, and with ``cfg`` those of its null-condition row ``n + row``.

    ``offsets``: column c of row r is ``hidden[r, c - offsets[r]]`` (a pass after a shared prefix)."""

    def read(r: int) -> Tensor:
        start = int(batch.bidir_start[r]) - (offsets[r] if offsets else 0)
        return head(hidden[r, start:start + frames]).float()

    return read(row), read(n + row) if cfg else None


# ----------------------------------------------------------------------------- full-sequence passes


def prefix_columns(segment: Tensor) -> Tensor:
    """(B,) the text + lang + prompt columns of each row of a task-after-prompt layout: where its task token is."""
    return (segment == tasks.TASK).int().argmax(1)


class Passes:
    """The full-sequence passes over one set of rows (the NAR levels, the NAR-len rounds): hidden states.

    With ``task_after_prompt`` (model/config.py) every pass shares its causal prefix, text + lang +
    prompt, with every other: the first pass runs it into a KV cache, and each pass, that one included,
    runs only its own columns from the task token on against it, so K - 1 NAR passes cost one prefix
    and K - 1 responses instead of K - 1 whole sequences. Models of the task-first layout run whole
    sequences. ``room``: the most columns (task token + response) one pass has.
    """

    def __init__(self, model: CodecLM, room: int):
        self.model, self.room = model, room
        self.cache: Any = None
        self.lengths: list[int] = []  # prefix columns of each row
        self.valid: Tensor | None = None  # (B, S0) bool: the prefix slots of each row

    def adopt(self, cache: Any, prefix_lengths: list[int], device: torch.device) -> None:
        """Take over a cache that already holds every row's prefix in its first slots (the AR's, whose rows
        were laid out the same way), so the passes run no prefix of their own."""
        s0 = max(prefix_lengths)
        self.cache, self.lengths = cache, list(prefix_lengths)
        self.valid = torch.arange(s0, device=device)[None] < torch.tensor(prefix_lengths, device=device)[:, None]
        self.cache.crop(s0)

    def hidden(self, batch: Batch) -> tuple[Tensor, list[int] | None]:
        """Hidden states of a laid-out batch, and the offsets to read them with (see _response_logits):
        (B, S, D) and None for whole sequences; (B, n, D) of the columns from each row's task token on."""
        model = self.model
        if not model.config.task_after_prompt:
            return model.hidden_states(batch)[0], None
        if self.cache is None:
            self._run_prefix(batch)
        b, s = batch.segment.shape
        if b != len(self.lengths):
            raise ValueError(f"Passes: a batch of {b} rows after a prefix of {len(self.lengths)}")
        device = batch.segment.device
        prefix = torch.tensor(self.lengths, device=device)  # (B,)
        ends = (batch.segment != tasks.PAD).sum(1)  # (B,)
        n = int((ends - prefix).max())
        assert self.valid is not None
        s0 = self.valid.shape[1]
        if s0 + n > self.cache.max_len:
            raise ValueError(f"Passes: {n} columns after a prefix of {s0}, a cache of {self.cache.max_len} slots")
        j = torch.arange(n, device=device)
        cols = (prefix[:, None] + j[None]).clamp_max(s - 1)  # (B, n) the columns of each row's task + response
        in_row = j[None] < (ends - prefix)[:, None]  # (B, n)
        x = model.embed(batch)  # (B, S, D)
        x = x.gather(1, cols[..., None].expand(-1, -1, x.shape[-1]))  # (B, n, D)
        positions = batch.positions.gather(1, cols)
        # the response is bidirectional from its first column on; the task token sees the prefix and itself
        own = prefix_bidirectional_mask(in_row, batch.bidir_start - prefix)  # (B, 1, n, n)
        mask = torch.cat([self.valid[:, None, None, :].expand(-1, -1, n, -1), own], dim=-1)  # (B, 1, n, S0 + n)
        hidden = model.backbone(x, positions, mask, cache=self.cache).hidden  # (B, n, D)
        self.cache.crop(s0)  # the next pass writes its own columns there
        return hidden, self.lengths

    def _run_prefix(self, batch: Batch) -> None:
        model = self.model
        seg = batch.segment
        prefix = prefix_columns(seg)  # (B,)
        s0 = int(prefix.max())
        self.lengths = prefix.tolist()
        self.valid = torch.arange(s0, device=seg.device)[None] < prefix[:, None]  # (B, S0)
        x = model.embed(batch)[:, :s0]  # columns past a row's prefix are masked out (never read)
        causal = torch.full((seg.shape[0],), s0, device=seg.device)
        mask = prefix_bidirectional_mask(self.valid, causal)
        self.cache = model.backbone.new_cache(seg.shape[0], s0 + self.room, seg.device, _cache_dtype(x, seg.device))
        model.backbone(x, batch.positions[:, :s0], mask, cache=self.cache)


# ----------------------------------------------------------------------------- AR (level 0)


CACHE_BUCKET = 256  # fixed-shape decoding: cache lengths rounded up to a multiple of this (fewer recompiles)


def step_function(model: CodecLM, config: GenerateConfig) -> Callable[..., Tensor]:
    """The one-frame cached AR step, ``hidden (B, 1, D)`` of the new frame.

    Dynamic shapes (the default): ``step(x (B, 1, D), positions (B, 1), mask (B, 1, 1, S) | None, cache)``,
    attending over the filled slots only (``Transformer.forward``), cheapest eagerly. Fixed shape
    (``config.fixed_shape`` or ``config.compile``): ``step(x, positions, slots (1,), mask (B, 1, 1, max_len),
    cache)`` (``Transformer.decode``). Compiled, it is traced once with ``fullgraph=True`` (a graph break is an
    error, not a slow path), and on CUDA with ``mode="reduce-overhead"``: CUDA graphs replay the whole step.
    Both need the native backbone (its cache is plain tensors; HF caches are not traceable objects).
    """
    backbone = model.backbone
    if not (config.compile or config.fixed_shape):
        def step(x: Tensor, positions: Tensor, mask: Tensor | None, cache: Any) -> Tensor:
            return backbone(x, positions, mask, cache=cache).hidden

        return step
    if model.config.arch != "transformer":
        raise InputError(f"--compile needs --arch transformer (the {model.config.arch} backbone's cache is not "
                         "compilable); sample without --compile")

    def fixed(x: Tensor, positions: Tensor, slots: Tensor, mask: Tensor, cache: Any) -> Tensor:
        return backbone.decode(x, positions, slots, mask, cache)

    if not config.compile:
        return fixed
    compiled = getattr(model, "_compiled_step", None)
    if compiled is None:
        cuda = next(model.parameters()).is_cuda
        compiled = torch.compile(fixed, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)
        model._compiled_step = compiled  # type: ignore[attr-defined]  # built once, reused by every call
    return compiled


@dataclass
class ARDecoder:
    """The state the AR loop carries from frame to frame, for B rows (with CFG: the n requests, then their
    n null-condition rows). ``h`` (B, D) is the hidden state the next frame is read from."""

    model: CodecLM
    step: Callable[..., Tensor] | None  # the one-frame cached step (see step_function); None without a cache
    cache: Any  # the backbone's KV cache; None: recompute the whole sequence every frame
    valid: Tensor  # (B, cache slots) bool: the filled, non-padding slots
    prefix_len: int  # S0: the padded prefix length
    next_position: Tensor  # (B,) position of each row's next frame
    step_needs_mask: bool  # padded rows need a step mask; without padding plain causal attention (flash) runs
    h: Tensor  # (B, D)
    seq_x: Tensor | None  # without a cache: the whole sequence so far (B, S, D)
    seq_pos: Tensor | None  # and its positions (B, S)
    slot: Tensor | None = None  # fixed shape: (1,) the cache slot of the next frame, advanced in place
    prefix_lengths: list[int] | None = None  # task_after_prompt: each row's text + lang + prompt slots

    def feed(self, token: Tensor, t: int) -> None:
        """Append frame ``t`` (token (B,)) to every row and move ``h`` to it."""
        x = self.model.resp_ar(token)[:, None]  # (B, 1, D)
        s = self.prefix_len + t + 1  # slots filled once this frame is in
        self.valid[:, s - 1] = True
        # (B, 1); a row that ended at its context limit stays finished: hold it at the last position
        positions = self.next_position[:, None].clamp_max(self.model.config.max_positions - 1)
        if self.slot is not None:  # the whole cache under the mask: the same shapes every step
            self.h = self.step(x, positions, self.slot, self.valid[:, None, None, :], self.cache)[:, 0]
            self.slot += 1
        elif self.cache is not None:
            mask = decode_step_mask(self.valid[:, :s], 1) if self.step_needs_mask else None
            self.h = self.step(x, positions, mask, self.cache)[:, 0]
        else:  # recompute everything, as e-c-k-e-r/vall-e does
            self.seq_x, self.seq_pos = torch.cat([self.seq_x, x], 1), torch.cat([self.seq_pos, positions], 1)
            causal = torch.full((len(token),), s, dtype=torch.long, device=token.device)  # no bidirectional part
            mask = prefix_bidirectional_mask(self.valid[:, :s], causal)
            self.h = self.model.backbone(self.seq_x, self.seq_pos, mask).hidden[:, -1]
        self.next_position = self.next_position + 1


def ar_prefill(model: CodecLM, requests: list[Request], config: GenerateConfig, cfg: bool) -> ARDecoder:
    """Lay out the AR prefixes (text, lang, task, prompt; with ``cfg`` also the null-condition rows) and run
    them through the backbone once, filling the KV cache; the decoder is ready for the first frame."""
    device = next(model.parameters()).device
    empty = [np.zeros((model.config.n_codebooks, 0), np.int64)] * len(requests)
    batch = _layout(model, _examples(requests, "ar", empty, 0, cfg), str(device))
    b, s0 = batch.segment.shape
    valid_prefix = batch.segment != tasks.PAD  # (B, S0)
    last = valid_prefix.sum(1) - 1  # (B,) each row's last prefix slot
    fixed = config.use_cache and (config.fixed_shape or config.compile)
    slots = s0 + config.max_frames
    if fixed:  # one cache length for many requests, so a compiled step is reused
        slots = -(-slots // CACHE_BUCKET) * CACHE_BUCKET
    valid = torch.zeros(b, slots, dtype=torch.bool, device=device)
    valid[:, :s0] = valid_prefix
    x = model.embed(batch)  # (B, S0, D)
    step = step_function(model, config) if config.use_cache else None
    mask = prefix_bidirectional_mask(valid_prefix, batch.bidir_start)
    cache = None
    if config.use_cache:
        cache = model.backbone.new_cache(b, slots, device, _cache_dtype(x, device))
        if fixed and config.compile and device.type == "cuda":  # CUDA graphs: the cache keeps its addresses
            for buffer in (*cache.k, *cache.v):
                torch._dynamo.mark_static_address(buffer)
    hidden = model.backbone(x, batch.positions, mask, cache=cache).hidden  # (B, S0, D)
    return ARDecoder(model=model, step=step, cache=cache, valid=valid, prefix_len=s0,
                     next_position=batch.positions.gather(1, last[:, None]).squeeze(1) + 1,
                     step_needs_mask=not bool(valid_prefix.all()), h=hidden[torch.arange(b, device=device), last],
                     seq_x=None if config.use_cache else x, seq_pos=None if config.use_cache else batch.positions,
                     slot=torch.full((1,), s0, dtype=torch.long, device=device) if fixed else None,
                     prefix_lengths=prefix_columns(batch.segment).tolist() if model.config.task_after_prompt else None)


def _cache_dtype(x: Tensor, device: torch.device) -> torch.dtype:
    """Under autocast the keys / values are made in the autocast dtype: store them in it."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return x.dtype


def ar_next_token(model: CodecLM, h: Tensor, out: Tensor, t: int, config: GenerateConfig, cfg: bool,
                  generator: torch.Generator | None) -> Tensor:
    """(n,) frame ``t`` of every request from ``h`` (B, D); ``out`` (n, max_frames) holds the frames so far."""
    params, stop, n = config.ar, model.config.codebook_size, out.shape[0]
    logits = model.head_ar(h).float()  # (B, V + 1)
    if t < config.min_frames:
        logits[:, stop] = -math.inf
    cond, uncond = (logits[:n], logits[n:]) if cfg else (logits, None)
    history = out[:, max(0, t - params.repetition_window):t]
    return sample_tokens(cond, params, generator, history=history, uncond=uncond, step=t, stop=stop)


def _until_stop(codes: np.ndarray, stop: int) -> list[np.ndarray]:
    """Each row of (n, T) codes up to (not including) its first stop token."""
    results = []
    for row in codes:
        stops = np.flatnonzero(row == stop)
        results.append(row[:stops[0]] if len(stops) else row)
    return results


@torch.no_grad()
def generate_ar(model: CodecLM, requests: list[Request], config: GenerateConfig,
                generator: torch.Generator | None = None, stats: GenerateStats | None = None,
                passes: Passes | None = None) -> list[np.ndarray]:
    """Level-0 codes (T_i,) per request, up to (not including) the stop token.

    ``passes``: hand the AR's KV cache, whose first slots hold every row's prefix, to the NAR passes
    that follow (task_after_prompt models; the same rows: CFG on in both passes or in neither)."""
    start_time = time.perf_counter()
    cfg = config.ar.cfg_strength != 0
    # a row ends at max_frames or at the end of the model's context, whichever comes first
    limits = [min(config.max_frames, frames_room(model.config, r)) for r in requests]
    config = replace(config, max_frames=max(limits))
    decoder = ar_prefill(model, requests, config, cfg)
    n, stop, device = len(requests), model.config.codebook_size, decoder.valid.device
    limit = torch.tensor(limits, device=device)  # (n,)
    out = torch.full((n, config.max_frames), stop, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = 0
    for t in range(config.max_frames):
        token = ar_next_token(model, decoder.h, out, t, config, cfg, generator)
        token = torch.where(done | (t >= limit), stop, token)  # a finished row keeps emitting the stop token
        out[:, t] = token
        done |= token == stop
        steps = t + 1
        if steps % config.sync_every == 0 and bool(done.all()):  # one host sync every sync_every frames
            break
        if steps == config.max_frames:
            break
        decoder.feed(token.repeat(2) if cfg else token, t)  # the null rows continue the same response
    if passes is not None and decoder.cache is not None and decoder.prefix_lengths is not None:
        passes.adopt(decoder.cache, decoder.prefix_lengths, decoder.valid.device)
    if stats is not None:
        stats.ar_frames += steps
        stats.ar_seconds += time.perf_counter() - start_time
    return _until_stop(out[:, :steps].cpu().numpy(), stop)


# ----------------------------------------------------------------------------- NAR (levels 1..K-1)


@torch.no_grad()
def generate_nar(model: CodecLM, requests: list[Request], level0: list[np.ndarray], config: GenerateConfig,
                 generator: torch.Generator | None = None, stats: GenerateStats | None = None,
                 passes: Passes | None = None) -> list[np.ndarray]:
    """(K, T_i) codes per request: level 0 given, each further level from the ones below in one pass.
    ``passes``: holding the AR's prefix already (generate_ar's ``passes``); None: a prefix of their own."""
    start_time = time.perf_counter()
    device = str(next(model.parameters()).device)
    k = model.config.n_codebooks
    codes = []
    for row in level0:
        full = np.zeros((k, len(row)), np.int64)
        full[0] = row
        codes.append(full)
    params = config.nar
    cfg = params.cfg_strength != 0
    n = len(requests)
    passes = passes or Passes(model, room=1 + max(len(row) for row in level0))  # the task token + the response
    for level in range(1, k):
        batch = _layout(model, _examples(requests, "nar", codes, level, cfg), device)
        hidden, offsets = passes.hidden(batch)
        head = model.head_nar[level - 1]
        for i in range(n):
            if codes[i].shape[1] == 0:
                continue
            logits, uncond = _response_logits(head, hidden, batch, i, n, codes[i].shape[1], cfg, offsets)  # (T, V)
            codes[i][level] = sample_tokens(logits, params, generator, uncond=uncond).cpu().numpy()
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


def nar_len_durations(model: CodecLM, requests: list[Request], config: GenerateConfig) -> list[int]:
    """Frames per request: its ``duration``, else the len head's prediction (within the model's context);
    within 1..max_frames."""
    predicted = None
    if any(r.duration is None for r in requests):
        predicted = predict_durations(model, requests, config)
    lengths = [r.duration if r.duration is not None else min(predicted[i], frames_room(model.config, r))
               for i, r in enumerate(requests)]
    return [int(min(max(t, 1), config.max_frames)) for t in lengths]


def remask(tokens: np.ndarray, masked: np.ndarray, sampled: np.ndarray, scores: np.ndarray, progress: float,
           last_round: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fill the masked frames of (T,) ``tokens`` with their samples, then mask again the lowest-scored of them:
    floor(T cos(pi/2 progress)) frames (the cosine schedule), always at least one fewer than before and none
    after the last round. Kept tokens are never masked again. Returns the new tokens and mask."""
    t = len(tokens)
    tokens = np.where(masked, sampled, tokens)
    scores = np.where(masked, scores, np.inf)
    n_masked = int(math.floor(t * math.cos(math.pi / 2 * progress)))
    n_masked = min(n_masked, int(masked.sum()) - 1) if not last_round else 0
    new_mask = np.zeros(t, bool)
    if n_masked > 0:
        new_mask[np.argsort(scores, kind="stable")[:n_masked]] = True
    return tokens, new_mask


def demask_round(model: CodecLM, requests: list[Request], tokens: list[np.ndarray], masked: list[np.ndarray],
                 step: int, config: GenerateConfig, generator: torch.Generator | None,
                 passes: Passes | None = None) -> None:
    """Round ``step`` of demasking: sample every masked frame of every row, keep the best (``tokens`` and
    ``masked`` are updated in place). Guidance grows and the temperature falls with the rounds.
    ``passes``: the rounds' shared prefix (one per generate_nar_len call; None: a pass of its own)."""
    params, k, n = config.demask, model.config.n_codebooks, len(requests)
    progress = (step + 1) / config.steps
    strength = params.cfg_strength * progress if params.cfg_strength else 0.0  # annealed guidance
    cfg = strength != 0
    temperature = params.temperature * (1 - progress) if params.temperature > 0 else params.temperature
    draw_params = replace(params, temperature=temperature, cfg_strength=0.0)  # guidance is applied before the draw
    codes = []
    for i in range(n):
        c = np.zeros((k, len(tokens[i])), np.int64)
        c[0] = np.where(masked[i], 0, tokens[i])
        codes.append(c)
    batch = _layout(model, _examples(requests, "mask", codes, 0, cfg, masked), str(next(model.parameters()).device))
    passes = passes or Passes(model, room=1 + max(len(t) for t in tokens))
    hidden, offsets = passes.hidden(batch)
    for i in range(n):
        logits, uncond = _response_logits(model.head_mask, hidden, batch, i, n, len(tokens[i]), cfg, offsets)
        guided = guide(logits, uncond, strength, params.cfg_rescale)  # once: for the draw and the scores
        sampled = sample_tokens(guided, draw_params, generator)  # (T,)
        # scores from the unfiltered probabilities of what was drawn
        scores = guided.softmax(-1).gather(1, sampled[:, None]).squeeze(1).cpu().numpy()
        tokens[i], masked[i] = remask(tokens[i], masked[i], sampled.cpu().numpy(), scores, progress,
                                      last_round=step + 1 == config.steps)


@torch.no_grad()
def generate_nar_len(model: CodecLM, requests: list[Request], config: GenerateConfig,
                     generator: torch.Generator | None = None, stats: GenerateStats | None = None,
                     on_step: Callable[[int, list[np.ndarray], list[np.ndarray]], None] | None = None
                     ) -> list[np.ndarray]:
    """Level-0 codes (T_i,) per request by iterative demasking; ``on_step(i, codes, masked)`` sees every round."""
    start_time = time.perf_counter()
    lengths = nar_len_durations(model, requests, config)
    tokens = [np.zeros(t, np.int64) for t in lengths]
    masked = [np.ones(t, bool) for t in lengths]
    passes = Passes(model, room=1 + max(lengths))  # every round shares the prefix (and its rows: cfg stays on or off)
    for step in range(config.steps):
        demask_round(model, requests, tokens, masked, step, config, generator, passes)
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


def frames_room(config: ModelConfig, request: Request) -> int:
    """Response frames that fit in the model's ``max_positions`` after this request's text and prompt (<= 0: none).

    With unified positions the whole row counts (text, lang, task, prompt (+ SEP), response: positions
    0..S-1); otherwise positions restart in every segment, so each segment must fit on its own. The AR
    start slot needs no room of its own: the last frame is never fed back.
    """
    prompt = request.prompt.shape[1] + (request.prompt_split >= 0)
    if config.unified_positions:
        return config.max_positions - (len(request.text) + 2 + prompt)
    return config.max_positions if max(len(request.text), prompt) <= config.max_positions else 0


def check_context(model: CodecLM, requests: list[Request]) -> None:
    """Every request leaves room for a response, and a forced duration fits (RoPE tables end at max_positions)."""
    limit = model.config.max_positions
    for i, r in enumerate(requests):
        room = frames_room(model.config, r)
        if room < 1:
            raise InputError(f"request {i}: {len(r.text)} text tokens and a prompt of {r.prompt.shape[1]} frames "
                             f"fill the model's {limit} positions: shorten the prompt or the text")
        if r.duration is not None and r.duration > room:
            raise InputError(f"request {i}: {r.duration} frames asked, past the model's context of {limit} positions "
                             f"(room for {room} frames after this text and prompt)")


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
    check_context(model, requests)


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
    passes = None
    if mode == "ar+nar":
        same_rows = (config.ar.cfg_strength != 0) == (config.nar.cfg_strength != 0)  # the null rows too, or neither
        shared = Passes(model, room=0) if same_rows and config.use_cache else None  # the AR's cache, adopted
        level0 = generate_ar(model, requests, config, generator, stats, passes=shared)
        passes = shared if shared is not None and shared.cache is not None else None
    else:
        level0 = generate_nar_len(model, requests, config, generator, stats)
    return generate_nar(model, requests, level0, config, generator, stats, passes=passes)


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


# ----------------------------------------------------------------------------- continuation and in-fill (no text)


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
