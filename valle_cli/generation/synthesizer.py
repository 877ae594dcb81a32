"""``valle sample``: text + a voice prompt -> codes, with a trained checkpoint (the library side).

    synth = Synthesizer.load("run/", device="cpu")
    item = synth.tts("Hello there. How are you?", prompts=["ref.wav"], config=GenerateConfig())
    formats.write_codes("out.npz", item)

A prompt is audio (encoded with the checkpoint's codec) or codes (.npz, which must come from the
same codec as the model); several prompts are joined in time and cropped to ``prompt_seconds``.
Text is phonemized and tokenized exactly as the training text was (the settings travel in the
checkpoint). Several sentences are generated one by one, each prompted by the reference and the
previous ``context_history`` outputs, and every segment is kept: the npz holds the joined codes
and a ``segments`` array of frames per sentence. ``tts_manifest`` writes one npz per row of an
id|text|prompt manifest, in batches.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import checkpoint as ckpt
from valle_cli import formats
from valle_cli.codecs import check_same_codec, codec_from_spec, describe
from valle_cli.errors import InputError, PartialFailure, ValleError
from valle_cli.generation.generate import (
    GenerateConfig,
    GenerateStats,
    Request,
    continue_audio,
    frames_room,
    infill,
    synthesize,
    synthesize_long,
)
from valle_cli.generation.params import check_settings

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=\S)")


@dataclass
class ManifestReport:
    """What ``Synthesizer.tts_manifest`` did."""

    rows: int = 0  # rows of the manifest
    written: int = 0  # npz files this run wrote
    skipped: int = 0  # rows whose npz was already there
    failures: dict[str, str] = field(default_factory=dict)  # row id -> reason


def check_output_ids(manifest: str | os.PathLike[str], ids: list[str]) -> None:
    """Every id names a file inside the output folder (``spk/utt`` is fine; an absolute id or one with a '..'
    part is not). A manifest with such an id is refused whole, before anything is generated: it was made
    wrongly or to overwrite files elsewhere, and neither deserves the time to sample its other rows."""
    bad = [uid for uid in ids if Path(uid).is_absolute() or ".." in Path(uid).parts]
    if bad:
        shown = ", ".join(repr(uid) for uid in bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise InputError(f"{manifest}: {len(bad)} id(s) would write outside the output folder ({shown}): an id is "
                         "a relative name without '..'")


def split_sentences(text: str) -> list[str]:
    """'One. Two? Three!' -> ['One.', 'Two?', 'Three!'] (blank pieces dropped)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


@dataclass
class Synthesizer:
    model: Any  # CodecLM in eval mode
    meta: dict[str, Any]  # the checkpoint's config.json
    folder: Path  # the checkpoint folder
    device: str
    _codec: Any = None

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu", which: str = "last",
             quantize: str = "none") -> Synthesizer:
        """The checkpoint's model, ready to sample; ``quantize="int8"``: int8 weights (see
        model.load.prepare_for_decoding)."""
        from valle_cli.model.load import load_model, prepare_for_decoding

        folder = ckpt.resolve_checkpoint(path, which)
        model, meta = load_model(folder, device)
        prepare_for_decoding(model, quantize)
        return cls(model=model, meta=meta, folder=folder, device=device)

    # -- the codec and its files

    @property
    def codec_spec(self) -> dict[str, Any]:
        """The model's codec, pointing at the checkpoint's copy of a fitted codec when there is one."""
        spec = dict(self.meta["codec"])
        if spec.get("name") == "builtin" and (self.folder / "codec.safetensors").is_file():
            spec["path"] = str((self.folder / "codec.safetensors").resolve())
        return spec

    def codec(self) -> Any:
        if self._codec is None:
            self._codec = codec_from_spec(self.codec_spec, self.device, search=[self.folder, self.folder.parent.parent])
        return self._codec

    @property
    def frame_rate(self) -> float:
        return float(self.meta["frame_rate"])

    @property
    def sample_rate(self) -> int:
        if self.meta.get("sample_rate"):
            return int(self.meta["sample_rate"])
        return int(self.codec().sample_rate)

    # -- inputs

    def codes_of(self, source: str | os.PathLike[str] | bytes, what: str | None = None) -> np.ndarray:
        """(K, T) int64 codes of the model's codec from one file: a codes npz (bytes: one read from stdin),
        which must come from that codec, or audio, encoded with it. ``what`` names the file in errors."""
        name = "<stdin>" if isinstance(source, bytes) else str(source)
        what = what or name
        if isinstance(source, bytes) or Path(source).suffix.lower() == ".npz":
            item = formats.codes_from_bytes(source) if isinstance(source, bytes) else formats.read_codes(source)
            check_same_codec(self.meta["codec"], item.codec, what)
            codes = np.asarray(item.codes, np.int64)
        else:
            from valle_cli.codecs.quantize import quantize_file

            codes = np.asarray(quantize_file(source, self.codec(), name=name).codes, np.int64)
        k, size = self.model.config.n_codebooks, self.model.config.codebook_size
        if codes.shape[0] != k:
            raise InputError(f"{what}: {codes.shape[0]} codebooks, the model has {k}")
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise InputError(f"{what}: codes outside [0, {size}) of {describe(self.meta['codec'])}")
        return codes

    def prompt_codes(self, prompts: list[str | os.PathLike[str] | bytes], prompt_seconds: float | None) -> np.ndarray:
        """(K, P) codes of the prompts joined in time, cropped to the first ``prompt_seconds``."""
        parts = [self.codes_of(p, "prompt " + ("<stdin>" if isinstance(p, bytes) else str(p))) for p in prompts]
        k = self.model.config.n_codebooks
        joined = np.concatenate(parts, axis=1) if parts else np.zeros((k, 0), np.int64)
        if prompt_seconds is not None and prompt_seconds > 0:
            joined = joined[:, :max(1, int(round(prompt_seconds * self.frame_rate)))]
        return joined

    def text_tokens(self, text: str) -> np.ndarray:
        from valle_cli.text.phonemize import text_to_tokens

        meta = {"tokenizer": self.meta["tokenizer"], "settings": self.meta.get("text_settings", {})}
        _, tokens = text_to_tokens(text, meta)
        return np.asarray(tokens, np.int64)

    def check_room(self, frames: int, prompt: np.ndarray, text: np.ndarray, what: str, split: int = -1) -> None:
        """``frames`` of response fit in the model's positions after ``text`` and ``prompt``, else a one-line
        error that names ``what`` was asked, the limit and how much does fit."""
        room = frames_room(self.model.config, Request(text, prompt, prompt_split=split))
        if frames > room:
            raise InputError(f"{what}: {frames / self.frame_rate:.2f} s ({frames} frames) is past the model's context "
                             f"of {self.model.config.max_positions} positions (room for "
                             f"{max(room, 0) / self.frame_rate:.2f} s after this text and prompt)")

    def sampling_defaults(self) -> dict[str, Any]:
        """The generation settings saved with the checkpoint (its run's TOML [sample] table): what
        ``valle sample`` uses where no flag says otherwise."""
        return check_settings(self.meta.get("sampling") or {}, f"{self.folder / 'config.json'}: sampling")

    def default_prompt_seconds(self) -> float:
        return float(self.meta.get("tasks", {}).get("prompt_seconds", [3.0, 6.0])[1])

    # -- outputs

    def to_codes(self, codes: np.ndarray, segments: list[int] | None = None, text: str = "") -> formats.Codes:
        extra = {"segments": np.asarray(segments, np.int64)} if segments else {}
        return formats.Codes(codes=np.asarray(codes, np.int16), sample_rate=self.sample_rate,
                             frame_rate=self.frame_rate, codec=self.codec_spec, source="",
                             seconds=codes.shape[1] / self.frame_rate, extra=extra)

    # -- generation

    def tts(self, text: str, prompts: list[Any], config: GenerateConfig = GenerateConfig(),
            prompt_seconds: float | None = None, context_history: int = 1, lang: int = 0,
            duration_seconds: float | None = None, seed: int | None = None,
            stats: GenerateStats | None = None) -> formats.Codes:
        """One text (one or more sentences) in the prompt's voice -> Codes."""
        prompt = self.prompt_codes(prompts, self.default_prompt_seconds() if prompt_seconds is None else prompt_seconds)
        sentences = split_sentences(text)
        if not sentences:
            raise InputError("empty --text: nothing to say")
        tokens = [self.text_tokens(s) for s in sentences]
        with self.autocast():
            if len(tokens) == 1:
                duration = None if duration_seconds is None else max(1, round(duration_seconds * self.frame_rate))
                if duration is not None:
                    self.check_room(duration, prompt, tokens[0], f"--duration {duration_seconds:g}")
                (codes,) = synthesize(self.model, [Request(tokens[0], prompt, lang, duration)], config, seed, stats)
                return self.to_codes(codes)
            codes, frames = synthesize_long(self.model, tokens, prompt, config, context_history, lang, seed, stats)
        return self.to_codes(codes, frames)

    def tts_batch(self, texts: list[str], prompts: list[np.ndarray], config: GenerateConfig, lang: int = 0,
                  seed: int | None = None, stats: GenerateStats | None = None) -> list[formats.Codes]:
        """Single-sentence texts with their (K, P) prompts, generated as one batch."""
        requests = [Request(self.text_tokens(t), p, lang) for t, p in zip(texts, prompts, strict=True)]
        with self.autocast():
            return [self.to_codes(c) for c in synthesize(self.model, requests, config, seed, stats)]

    def tts_manifest(self, manifest: str | os.PathLike[str], out: str | os.PathLike[str],
                     config: GenerateConfig = GenerateConfig(), *, prompt_seconds: float | None = None, lang: int = 0,
                     batch_size: int = 8, seed: int | None = None, overwrite: bool = False,
                     stats: GenerateStats | None = None,
                     on_progress: Callable[[int], None] | None = None) -> ManifestReport:
        """``<out>/<id>.npz`` for every row of an id|text|prompt manifest (``formats.read_sample_manifest``).

        Ids must stay inside ``out`` (``check_output_ids``). Rows whose npz exists are skipped unless
        ``overwrite``. Single-sentence rows are generated ``batch_size`` at a time (the batch that starts at
        single-sentence row i is seeded ``seed + i``), then the long-form rows one by one. A failed row does
        not stop the others: once every good row is written, PartialFailure lists the failed ones.
        ``on_progress(n)``: n more rows done or skipped.
        """
        rows = formats.read_sample_manifest(manifest)
        check_output_ids(manifest, [uid for uid, _, _ in rows])
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        formats.write_samples_info(out, str(self.folder), int(self.meta.get("step", 0)),
                                   config.max_frames / self.frame_rate, asdict(config))
        todo = [row for row in rows if overwrite or not (out / f"{row[0]}.npz").exists()]
        report = ManifestReport(rows=len(rows), skipped=len(rows) - len(todo))
        advance = on_progress or (lambda n: None)
        advance(report.skipped)
        single = [row for row in todo if len(split_sentences(row[1])) == 1]
        for start in range(0, len(single), batch_size):
            chunk = single[start:start + batch_size]
            self._tts_rows_together(chunk, out, config, prompt_seconds, lang,
                                    None if seed is None else seed + start, stats, report)
            advance(len(chunk))
        for uid, text, prompts in (row for row in todo if len(split_sentences(row[1])) != 1):
            try:
                item = self.tts(text, prompts, config, prompt_seconds=prompt_seconds, lang=lang, seed=seed,
                                stats=stats)
                formats.write_codes(out / f"{uid}.npz", item)
                report.written += 1
            except ValleError as e:
                report.failures[uid] = str(e)
            advance(1)
        if report.failures:
            raise PartialFailure(f"{len(report.failures)} row(s) of {manifest} failed ({report.written} sampled, "
                                 f"{report.skipped} already done)", report.failures)
        return report

    def _tts_rows_together(self, rows: list[tuple[str, str, list[str]]], out: Path, config: GenerateConfig,
                           prompt_seconds: float | None, lang: int, seed: int | None, stats: GenerateStats | None,
                           report: ManifestReport) -> None:
        """One batch of single-sentence manifest rows: a row whose prompt fails is left out of the batch,
        a batch that fails fails all its rows (in ``report.failures``)."""
        cut = self.default_prompt_seconds() if prompt_seconds is None else prompt_seconds
        ready = []
        for uid, text, prompts in rows:
            try:
                ready.append((uid, text, self.prompt_codes(prompts, cut)))
            except ValleError as e:
                report.failures[uid] = str(e)
        if not ready:
            return
        try:
            items = self.tts_batch([text for _, text, _ in ready], [p for _, _, p in ready], config, lang, seed, stats)
        except ValleError as e:
            report.failures.update({uid: str(e) for uid, _, _ in ready})
            return
        for (uid, _, _), item in zip(ready, items, strict=True):
            formats.write_codes(out / f"{uid}.npz", item)
            report.written += 1

    def continuation(self, prompts: list[Any], seconds: float, config: GenerateConfig, rollouts: int = 1,
                     context_seconds: float | None = None, lang: int = 0, seed: int | None = None,
                     stats: GenerateStats | None = None, chunks: str | os.PathLike[str] | None = None
                     ) -> formats.Codes:
        """The prompt audio continued by ``seconds``, ``rollouts`` times, on one tape (segments: prompt, parts).

        With ``chunks`` (score-chunks of the prompt's source) the prompt is the window of
        ``context_seconds`` that ends with the source's highest-priority chunk (never a void one).
        """
        prompt = self.prompt_codes(prompts, None)
        context = self.default_window_seconds() if context_seconds is None else context_seconds
        if chunks is not None:
            if len(prompts) != 1 or isinstance(prompts[0], bytes):
                raise InputError("--chunks picks a window of one prompt file: give exactly one --prompt path")
            prompt = self.priority_window(chunks, Path(prompts[0]), prompt, int(round(context * self.frame_rate)))
        frames = max(1, int(round(seconds * self.frame_rate)))
        context_frames = int(round(context * self.frame_rate))
        seen = prompt.shape[1] + (rollouts - 1) * frames  # the tape the last rollout continues
        seen = min(seen, context_frames) if context_frames > 0 else seen
        self.check_room(frames, np.zeros((prompt.shape[0], seen), np.int64), np.zeros(0, np.int64),
                        f"--continue-seconds {seconds:g} (--rollouts continues in parts)")
        with self.autocast():
            tape, parts = continue_audio(self.model, prompt, frames, config, rollouts, context_frames, lang, seed,
                                         stats)
        return self.to_codes(tape, parts)

    def infill(self, prefix: list[Any], suffix: list[Any], config: GenerateConfig, seconds: float | None = None,
               lang: int = 0, seed: int | None = None, stats: GenerateStats | None = None) -> formats.Codes:
        """prefix + a generated middle + suffix (segments: the three lengths)."""
        before, after = self.prompt_codes(prefix, None), self.prompt_codes(suffix, None)
        frames = None if seconds is None else max(1, int(round(seconds * self.frame_rate)))
        if frames is not None:
            self.check_room(frames, np.concatenate([before, after], axis=1), np.zeros(0, np.int64),
                            f"in-fill of {seconds:g} s", split=before.shape[1])
        with self.autocast():
            tape, parts = infill(self.model, before, after, config, frames, lang, seed, stats)
        return self.to_codes(tape, parts)

    def priority_window(self, chunks: str | os.PathLike[str], source: Path, codes: np.ndarray,
                        frames: int) -> np.ndarray:
        """(K, <= frames) codes ending where the source's top-priority, non-void chunk ends."""
        import polars as pl

        df, _ = formats.read_chunk_scores(chunks)
        for text in df["codec"].unique().to_list():
            check_same_codec(self.meta["codec"], json.loads(text), f"chunk scores {chunks}")
        uid = source_id(source, df["id"].unique().to_list())
        rows = df.filter((pl.col("id") == uid) & ~pl.col("void")).sort("priority", descending=True)
        if rows.is_empty():
            raise InputError(f"{chunks}: no scored, non-void chunk of {uid!r}")
        best = rows.row(0, named=True)
        end = min(int(best["frame_start"]) + int(best["frame_len"]), codes.shape[1])
        return codes[:, max(0, end - frames):end]

    def default_window_seconds(self) -> float:
        """Context of a continuation: half the training window (the model saw prompts of 25-75 % of it)."""
        return float(self.meta.get("train", {}).get("window_seconds", 10.0)) / 2

    def autocast(self) -> Any:
        import contextlib

        import torch

        if self.device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def source_id(path: Path, known: list[str]) -> str:
    """The utterance id of a prompt file: from a codes manifest above it, else the one id ending in its stem."""
    resolved = path.resolve()
    for folder in list(resolved.parents)[:4]:
        if (folder / formats.MANIFEST_NAME).is_file():
            manifest = formats.read_manifest(folder)
            for uid, rel in zip(manifest["id"], manifest["path"], strict=True):
                if (folder / rel).resolve() == resolved:
                    return uid
    matches = [k for k in known if k == path.stem or k.endswith("/" + path.stem)]
    if len(matches) != 1:
        raise InputError(f"{path}: cannot tell which scored source it is ({len(matches)} ids end in {path.stem!r})")
    return matches[0]
