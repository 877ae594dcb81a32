"""Training examples of the codec LM: which task each utterance trains, and the padded batch arrays.

For every utterance of a batch ``draw_examples`` picks (the tasks of the reference project
e-c-k-e-r/vall-e, as its model documentation describes them):

* a target codebook level from ``levels`` (``auto``: linear-decreasing, level i with weight K - i,
  so level 0 (which carries most of the signal and the duration) is trained most; ``equal``; or
  explicit probabilities);
* the task: level 0 is AR (causal next-code prediction with a stop token) or, with probability
  ``masked_p``, NAR-len (level 0 by masked prediction, ``mask_ratio`` of the frames masked, plus the
  duration read by the len head); level l >= 1 is NAR (level l from the levels below, in place);
* the prompt: another utterance of the same speaker (the shard index's candidates), a random crop
  of ``prompt_seconds``; none when the speaker has no other utterance;
* CFG-aware dropout: with ``cond_dropout_p`` both text and prompt are dropped (the null condition
  of classifier-free guidance), with ``prompt_dropout_p`` the prompt alone.

Audio continuation and in-fill (``window_examples``) use the same tasks on windows of
audio without text: continuation splits a window into a prompt (the past) and a response (what
follows); in-fill takes prefix + SEP + suffix as the prompt and the middle as the response (the
prefix-suffix-middle order of code in-filling), so the AR learns where the middle must stop.

``collate`` lays the examples out as one padded batch of numpy arrays (``SequenceBatch``); the
model (``model/valle.py``) embeds them. Randomness comes from the generator passed in, which the
trainer derives from (seed, step, rank): a resumed run draws exactly the same tasks.
numpy only, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from valle_cli.common import config_from_dict, config_to_dict
from valle_cli.errors import InputError

# Segment kinds, one per position of a sequence (0 = padding).
PAD, TEXT, LANG, TASK, PROMPT, RESPONSE, SEP = 0, 1, 2, 3, 4, 5, 6  # SEP: between in-fill prefix and suffix
IGNORE = -100  # target of positions without a loss
KINDS = ("ar", "nar", "mask")


@dataclass(frozen=True)
class TaskConfig:
    levels: str | tuple[float, ...] = "auto"  # auto | equal | one probability per level
    masked_p: float = 0.25  # share of level-0 draws trained as NAR-len (masked) instead of AR
    mask_ratio: float = 0.8  # fixed training mask ratio of NAR-len (e-c-k-e-r/vall-e: better than random ratios)
    cond_dropout_p: float = 0.05  # drop text + prompt: the CFG null condition
    prompt_dropout_p: float = 0.05  # drop the prompt only
    prompt_seconds: tuple[float, float] = (3.0, 6.0)  # prompt crop length range
    lang: int = 0  # language id of every example (one language per shard set today)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        return config_from_dict(cls, data, "tasks")


@dataclass
class Example:
    text: np.ndarray  # (L,) int: text tokens (L = 0 when dropped)
    prompt: np.ndarray  # (K, P) int: prompt codes (P = 0 when none)
    codes: np.ndarray  # (K, T) int: the response codes (targets)
    kind: str  # "ar" | "nar" | "mask"
    level: int  # target codebook level (0 for ar and mask)
    lang: int = 0
    mask: np.ndarray | None = None  # (T,) bool: masked frames of a "mask" example
    prompt_split: int = -1  # in-fill: a SEP goes before prompt frame prompt_split (prefix | suffix); -1 = none


@dataclass
class SequenceBatch:
    """Padded arrays of one batch; S = the longest sequence. Shapes in the comments."""

    segment: np.ndarray  # (B, S) int8: PAD, TEXT, LANG, TASK, PROMPT, RESPONSE
    text: np.ndarray  # (B, S) int64: text token at TEXT positions, else 0
    prompt: np.ndarray  # (B, K, S) int64: prompt codes at PROMPT positions, else 0
    response: np.ndarray  # (B, K, S) int64: response input codes at RESPONSE positions, else 0
    positions: np.ndarray  # (B, S) int64: RoPE positions
    lang: np.ndarray  # (B,) int64
    task: np.ndarray  # (B,) int64: task token: 0 = AR, l = NAR level l, K = NAR-len (masked)
    level: np.ndarray  # (B,) int64: target level
    bidir_start: np.ndarray  # (B,) int64: first bidirectional position (S for causal rows)
    targets: np.ndarray  # (B, S) int64: target code at loss positions, IGNORE elsewhere
    len_position: np.ndarray  # (B,) int64: position whose hidden state the len head reads (-1: none)
    len_target: np.ndarray  # (B,) int64: response frames for the len head (-1: no len loss)
    n_codebooks: int
    codebook_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.segment.shape

    @property
    def tokens(self) -> int:
        """Real (unpadded) positions in the batch."""
        return int((self.segment != PAD).sum())


def level_probabilities(levels: str | tuple[float, ...], n_codebooks: int, capabilities: tuple[str, ...]) -> np.ndarray:
    """(K,) probability of each target level; level 0 only without the NAR capability."""
    k = n_codebooks
    if isinstance(levels, str):
        if levels == "auto":
            p = np.arange(k, 0, -1, dtype=np.float64)  # level i with weight K - i
        elif levels == "equal":
            p = np.ones(k)
        else:
            raise InputError(f"levels {levels!r}: expected auto, equal or one probability per level")
    else:
        p = np.asarray(levels, dtype=np.float64)
        if p.shape != (k,) or (p < 0).any() or p.sum() <= 0:
            raise InputError(f"levels: expected {k} non-negative probabilities (one per codebook), got {list(levels)}")
    if "nar" not in capabilities:
        p = np.r_[1.0, np.zeros(k - 1)]
    if "ar" not in capabilities and "len" not in capabilities:
        p[0] = 0.0
        if p.sum() <= 0:
            raise InputError("capabilities: nothing left to train")
    return p / p.sum()


def task_token(kind: str, level: int, n_codebooks: int) -> int:
    return {"ar": 0, "nar": level, "mask": n_codebooks}[kind]


def crop(codes: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of at most ``frames`` frames of (K, T) codes."""
    t = codes.shape[1]
    if t <= frames:
        return codes
    start = int(rng.integers(0, t - frames + 1))
    return codes[:, start:start + frames]


def draw_examples(records: list[tuple[np.ndarray, np.ndarray]], prompts: list[np.ndarray | None],
                  rng: np.random.Generator, config: TaskConfig, frame_rate: float,
                  capabilities: tuple[str, ...] = ("ar", "nar", "len")) -> list[Example]:
    """One Example per (text, codes) record; ``prompts[i]`` is a (K, P) prompt source or None."""
    if not records:
        return []
    k = records[0][1].shape[0]
    p_levels = level_probabilities(config.levels, k, capabilities)
    masked_p = config.masked_p if "len" in capabilities else 0.0
    if "ar" not in capabilities:
        masked_p = 1.0
    lo, hi = config.prompt_seconds
    examples = []
    for (text, codes), source in zip(records, prompts, strict=True):
        kind, level = draw_task(rng, p_levels, masked_p)
        u = rng.random()
        drop_text = u < config.cond_dropout_p
        drop_prompt = u < config.cond_dropout_p + config.prompt_dropout_p
        prompt = np.zeros((k, 0), dtype=np.int64)
        if source is not None and not drop_prompt:
            frames = max(1, int(round(rng.uniform(lo, hi) * frame_rate)))
            prompt = crop(np.asarray(source, dtype=np.int64), frames, rng)
        examples.append(Example(
            text=np.zeros(0, dtype=np.int64) if drop_text else np.asarray(text, dtype=np.int64),
            prompt=prompt, codes=np.asarray(codes, dtype=np.int64), kind=kind, level=level, lang=config.lang,
            mask=draw_mask(rng, codes.shape[1], config.mask_ratio) if kind == "mask" else None,
        ))
    return examples


def draw_task(rng: np.random.Generator, p_levels: np.ndarray, masked_p: float) -> tuple[str, int]:
    """(kind, level): a level from p_levels; level 0 is "mask" with probability masked_p, else "ar"."""
    level = int(rng.choice(len(p_levels), p=p_levels))
    return ("nar" if level else ("mask" if rng.random() < masked_p else "ar")), level


def draw_mask(rng: np.random.Generator, frames: int, ratio: float) -> np.ndarray:
    """(T,) bool: round(ratio * T) (at least one) frames masked, chosen uniformly."""
    mask = np.zeros(frames, dtype=bool)
    if frames:
        mask[rng.choice(frames, size=min(max(1, int(round(ratio * frames))), frames), replace=False)] = True
    return mask


def window_examples(windows: list[np.ndarray], rng: np.random.Generator, config: TaskConfig, infill_p: float,
                    capabilities: tuple[str, ...] = ("ar", "nar", "len")) -> list[Example]:
    """Text-less examples from (K, W) windows of audio: continuation, or in-fill with probability infill_p.

    Continuation: the first 25-75 % of the window is the prompt, the rest the response. In-fill: a
    middle of 10-50 % of the window is the response; the prompt is prefix + SEP + suffix.
    A window of fewer than 4 frames is all response (nothing to condition on).
    """
    if not windows:
        return []
    k = windows[0].shape[0]
    p_levels = level_probabilities(config.levels, k, capabilities)
    masked_p = 1.0 if "ar" not in capabilities else (config.masked_p if "len" in capabilities else 0.0)
    examples = []
    for window in windows:
        window = np.asarray(window, dtype=np.int64)
        w = window.shape[1]
        kind, level = draw_task(rng, p_levels, masked_p)
        split = -1
        if w < 4:
            prompt, codes = window[:, :0], window
        elif rng.random() < infill_p:
            middle = max(1, int(round(rng.uniform(0.1, 0.5) * w)))
            a = int(rng.integers(1, w - middle)) if w - middle > 1 else 1
            prompt = np.concatenate([window[:, :a], window[:, a + middle:]], axis=1)
            codes, split = window[:, a:a + middle], a
        else:
            p = int(round(rng.uniform(0.25, 0.75) * w))
            prompt, codes = window[:, :p], window[:, p:]
        if rng.random() < config.cond_dropout_p:  # the null condition of CFG: no prompt at all
            prompt, split = window[:, :0], -1
        examples.append(Example(text=np.zeros(0, np.int64), prompt=prompt, codes=codes, kind=kind, level=level,
                                lang=config.lang, prompt_split=split,
                                mask=draw_mask(rng, codes.shape[1], config.mask_ratio) if kind == "mask" else None))
    return examples


def sequence_length(example: Example) -> int:
    """Positions of an example: text, lang, task, prompt (+ SEP), response (+1 start position for AR)."""
    return (len(example.text) + 2 + example.prompt.shape[1] + (example.prompt_split >= 0) + example.codes.shape[1]
            + (example.kind == "ar"))


def collate(examples: list[Example], codebook_size: int, unified_positions: bool = False,
            task_after_prompt: bool = False) -> SequenceBatch:
    """Lay out ``<text> <lang> <task> <prompt> <response>`` per row, right-padded to the longest; with
    ``task_after_prompt`` ``<text> <lang> <prompt> <task> <response>`` (ModelConfig.task_after_prompt:
    the causal prefix before the task token is then the same for every task of a request).

    Response inputs and targets per kind (codebook_size is the stop / start / mask id):
        ar    inputs [start, c0_0 .. c0_{T-1}]       targets [c0_0 .. c0_{T-1}, stop]   causal
        nar   inputs levels 0..l-1 of every frame    targets level l                    bidirectional response
        mask  inputs level 0, masked frames = mask   targets level 0 at masked frames   bidirectional response
    The len head reads the last prefix position of "mask" rows (causal, so it never sees the response).
    """
    if not examples:
        raise InputError("an empty batch")
    k = examples[0].codes.shape[0]
    out = _empty_batch(len(examples), max(sequence_length(e) for e in examples), k, codebook_size)
    for row, e in enumerate(examples):
        if e.codes.shape[0] != k or e.prompt.shape[0] != k:
            raise InputError(f"batch mixes codebook counts ({e.codes.shape[0]} vs {k})")
        r0 = _lay_out_prefix(out, row, e, unified_positions, task_after_prompt)
        out.lang[row], out.level[row] = e.lang, e.level
        out.task[row] = task_token(e.kind, e.level, k)
        _lay_out_response(out, row, e, r0)
    return out


def _empty_batch(b: int, s: int, k: int, codebook_size: int) -> SequenceBatch:
    """A batch of b rows of s PAD positions: zeros, IGNORE targets, causal rows, no len head."""
    return SequenceBatch(
        segment=np.zeros((b, s), np.int8), text=np.zeros((b, s), np.int64),
        prompt=np.zeros((b, k, s), np.int64), response=np.zeros((b, k, s), np.int64),
        positions=np.zeros((b, s), np.int64), lang=np.zeros(b, np.int64), task=np.zeros(b, np.int64),
        level=np.zeros(b, np.int64), bidir_start=np.full(b, s, np.int64), targets=np.full((b, s), IGNORE, np.int64),
        len_position=np.full(b, -1, np.int64), len_target=np.full(b, -1, np.int64), n_codebooks=k,
        codebook_size=codebook_size,
    )


def _lay_out_prefix(out: SequenceBatch, row: int, e: Example, unified_positions: bool,
                    task_after_prompt: bool) -> int:
    """Segments and positions of the whole row, text and prompt codes (+ SEP); returns where the response starts."""
    n_text, n_frames = len(e.text), e.codes.shape[1]
    has_sep = e.prompt_split >= 0
    n_prompt = e.prompt.shape[1] + has_sep
    n_resp = n_frames + (e.kind == "ar")
    kinds = (TEXT, LANG, PROMPT, TASK, RESPONSE) if task_after_prompt else (TEXT, LANG, TASK, PROMPT, RESPONSE)
    sizes = {TEXT: n_text, LANG: 1, TASK: 1, PROMPT: n_prompt, RESPONSE: n_resp}
    bounds = np.cumsum([0, *(sizes[kind] for kind in kinds)])  # segment starts, and the end
    for kind, start, stop_at in zip(kinds, bounds[:-1], bounds[1:], strict=True):
        out.segment[row, start:stop_at] = kind
        out.positions[row, start:stop_at] = (np.arange(start, stop_at) if unified_positions
                                             else np.arange(stop_at - start))
    t0, p0 = bounds[0], bounds[kinds.index(PROMPT)]
    out.text[row, t0:t0 + n_text] = e.text
    if has_sep:  # prefix, SEP, suffix
        cut = e.prompt_split
        out.prompt[row, :, p0:p0 + cut] = e.prompt[:, :cut]
        out.prompt[row, :, p0 + cut + 1:p0 + n_prompt] = e.prompt[:, cut:]
        out.segment[row, p0 + cut] = SEP
    else:
        out.prompt[row, :, p0:p0 + n_prompt] = e.prompt
    return int(bounds[4])


def _lay_out_response(out: SequenceBatch, row: int, e: Example, r0: int) -> None:
    """Response inputs, targets, attention and len head of one row, from position r0 (see ``collate``)."""
    stop, n_frames = out.codebook_size, e.codes.shape[1]
    if e.kind == "ar":
        out.response[row, 0, r0] = stop  # the start position
        out.response[row, 0, r0 + 1:r0 + n_frames + 1] = e.codes[0]
        out.targets[row, r0:r0 + n_frames] = e.codes[0]
        out.targets[row, r0 + n_frames] = stop
    elif e.kind == "nar":
        out.response[row, :e.level, r0:r0 + n_frames] = e.codes[:e.level]
        out.targets[row, r0:r0 + n_frames] = e.codes[e.level]
        out.bidir_start[row] = r0
    else:  # mask
        assert e.mask is not None
        out.response[row, 0, r0:r0 + n_frames] = np.where(e.mask, stop, e.codes[0])
        out.targets[row, r0:r0 + n_frames] = np.where(e.mask, e.codes[0], IGNORE)
        out.bidir_start[row] = r0
        out.len_position[row], out.len_target[row] = r0 - 1, n_frames
