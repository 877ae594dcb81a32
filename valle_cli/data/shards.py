"""Training shards: codes + phonemes -> ``shard-NNNNNN.bin`` files + ``index.parquet``, and their reader.

Writing (``build_shards``, the library side of ``valle shard``) goes top to bottom:

1. Read the inputs: codes folders (``manifest.parquet`` + one npz per utterance), phonemes files,
   optional chunk scores. All codes must come from one codec and all text from one tokenizer.
2. Join by utterance id and drop, counting each reason: no transcript, no codes, audio too short or
   too long, text too long. Ids found in one input only are also counted by input.
3. Give every utterance a speaker (a ``speaker`` column, else the first ``speaker_depth`` folders of
   its id) and a sampling weight (its mean chunk priority, scaled so the mean weight is 1; 1.0
   everywhere without chunk scores).
4. Split train/val from a seeded blake2b hash of the id (or of the speaker with
   ``split_by="speaker"``), so the split depends on neither file order nor Python's hash seed.
5. Order the rows by (split, id) and list for each one up to ``max_prompts`` other rows of the same
   speaker and split: the prompt candidates of zero-shot TTS.
6. Pack records into shards (never across two shards; each split starts a new shard), write each
   shard atomically, and write ``index.parquet`` LAST: an index present means a complete output.

Reading: ``ShardSet(folder, split=None)`` validates the headers against the index and memory-maps
each shard on first use; ``record(row)`` returns uint16 views, no copy. numpy + polars only, no torch.
FORMATS.md ("Training shards") is the spec of the files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import formats
from valle_cli.codecs import check_same_codec, describe, same_codec
from valle_cli.errors import CodecMismatchError, FormatError, InputError

SPLITS = ("train", "val")  # index rows are ordered by split in this order, then by id
SPLIT_BY = ("utterance", "speaker")
MISSING_CODES = "missing codes"
MISSING_TEXT = "missing transcript"
TOO_SHORT = "too short"
TOO_LONG = "too long"
TEXT_TOO_LONG = "text too long"
REASONS = (MISSING_CODES, MISSING_TEXT, TOO_SHORT, TOO_LONG, TEXT_TOO_LONG)
# EnCodec and DAC specs do not record their codebook size; both use 1024 entries per codebook.
_KNOWN_CODEBOOK_SIZES = {"encodec": 1024, "dac": 1024}
_EXAMPLES = 5  # ids kept per filter reason, for messages
# The tokenizer of a text-less shard set (no phonemes input): one id that no record uses.
NO_TEXT_TOKENIZER = {"kind": "none", "vocab_size": 1, "specials": {}}


@dataclass(frozen=True)
class ShardOptions:
    min_seconds: float = 0.5  # drop shorter utterances
    max_seconds: float = 30.0  # drop longer utterances
    max_text_tokens: int = 512  # drop utterances with more text tokens
    val_fraction: float = 0.02  # share of utterances held out for validation
    split_by: str = "utterance"  # "utterance" | "speaker" (whole speakers held out)
    speaker_depth: int = 1  # speaker = the first N folders of the id (when no speaker column)
    seed: int = 0  # the split and the prompt choice depend on it
    shard_mb: float = 256.0  # body size of one shard, MiB
    max_prompts: int = 64  # prompt candidates listed per utterance


@dataclass
class ShardReport:
    out: Path
    utterances: dict[str, int] = field(default_factory=dict)  # split -> utterances kept
    speakers: dict[str, int] = field(default_factory=dict)  # split -> distinct speakers
    seconds: dict[str, float] = field(default_factory=dict)  # split -> audio seconds
    shards: int = 0
    bytes: int = 0  # shard files in all
    filtered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few ids
    only_in: dict[str, int] = field(default_factory=lambda: {"codes": 0, "phonemes": 0})  # input -> ids
    unscored: int = 0  # kept utterances without chunk scores (given the mean weight) when chunks are used
    notes: list[str] = field(default_factory=list)  # warnings for the user
    wall_seconds: float = 0.0
    skipped: bool = False  # the output was complete already


@dataclass
class ShardPlan:
    """Everything ``write_shards`` needs: the final index (plus npz paths) and what the headers say."""

    index: Any  # polars DataFrame: SHARD_INDEX_SCHEMA columns + "path" (npz) + "tokens", in final row order
    header: formats.ShardHeader  # template: counts and shard number are filled per shard
    n_shards: int
    meta: dict[str, Any]  # index.parquet metadata
    report: ShardReport


# ----------------------------------------------------------------------------- inputs


def read_codes_folders(folders: Sequence[str | os.PathLike[str]]) -> tuple[Any, dict[str, Any]]:
    """Manifests of codes folders -> (DataFrame id, path (npz), frames, seconds[, speaker], codec spec)."""
    import polars as pl

    parts, spec, spec_from = [], None, None
    for folder in map(Path, folders):
        if not (folder / formats.MANIFEST_NAME).is_file():
            raise InputError(f"{folder}: no {formats.MANIFEST_NAME} (not a codes folder made by valle quantize)")
        df = formats.read_manifest(folder)
        for text in df["codec"].unique(maintain_order=True).to_list():
            found = json.loads(text)
            if spec is None:
                spec, spec_from = found, folder
            elif not same_codec(spec, found):
                where = f"{folder} mixes codecs" if spec_from == folder else f"{folder} and {spec_from} differ"
                raise CodecMismatchError(f"{where}: {describe(found)} vs {describe(spec)} (one codec per shard set)")
        keep = ["id", "frames", "seconds"] + (["speaker"] if "speaker" in df.columns else [])
        parts.append(df.select(*keep, path=pl.lit(f"{folder}{os.sep}") + pl.col("path")))
    if spec is None:
        raise InputError(f"{', '.join(map(str, folders))}: no codes in the manifest(s)")
    codes = pl.concat(parts, how="diagonal")
    _refuse_duplicates(codes, "codes folders")
    return codes, spec


def read_phonemes_files(paths: Sequence[str | os.PathLike[str]]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Phonemes files -> (DataFrame id, tokens[, speaker], tokenizer metadata, text settings of the first).

    One tokenizer for all. The settings (language, punctuation, stress, normalisation) travel to the
    checkpoints so ``sample`` phonemizes new text exactly as the training text was.
    """
    import polars as pl

    parts, tokenizer, settings = [], None, {}
    for path in paths:
        df, meta = formats.read_phonemes(path)
        if tokenizer is None:
            tokenizer, first, settings = meta["tokenizer"], path, meta.get("settings", {})
        elif meta["tokenizer"] != tokenizer:
            raise FormatError(f"{path} and {first} use different tokenizers (phonemize one with --vocab {first})")
        top = df["tokens"].list.max().max()
        if top is not None and top >= tokenizer["vocab_size"]:
            raise FormatError(f"{path}: token id {top} outside its tokenizer's {tokenizer['vocab_size']} ids")
        parts.append(df.select("id", "tokens", *(["speaker"] if "speaker" in df.columns else [])))
    phonemes = pl.concat(parts, how="diagonal")
    _refuse_duplicates(phonemes, "phonemes files")
    return phonemes, tokenizer, settings


def _refuse_duplicates(df: Any, what: str) -> None:
    dup = df.filter(df["id"].is_duplicated())["id"]
    if len(dup):
        raise InputError(f"id {dup[0]!r} appears twice in the {what} ({dup.n_unique()} duplicated id(s))")


def chunk_weights(paths: Sequence[str | os.PathLike[str]], codec: dict[str, Any]) -> Any:
    """Chunk scores -> DataFrame (id, raw_weight): the frame-weighted mean chunk priority (void chunks are 0)."""
    import polars as pl

    parts = []
    for path in paths:
        df, _ = formats.read_chunk_scores(path)
        for text in df["codec"].unique().to_list():
            check_same_codec(codec, json.loads(text), f"chunk scores {path}")
        parts.append(df.select("id", pl.col("priority").cast(pl.Float64).clip(lower_bound=0.0),
                               pl.col("frame_len").cast(pl.Float64)))
    scores = pl.concat(parts)
    mass = (pl.col("priority") * pl.col("frame_len")).sum() / pl.col("frame_len").sum().clip(lower_bound=1.0)
    return scores.group_by("id").agg(raw_weight=mass)


# ----------------------------------------------------------------------------- join, filter, split, prompts


def speaker_from_id(ids: Any, depth: int) -> Any:
    """Expression on a polars id column: 'spk/utt' -> 'spk' (depth 1); an id without such folders -> ''."""
    import polars as pl

    parts = ids.str.split("/")
    return pl.when(parts.list.len() > depth).then(parts.list.head(depth).list.join("/")).otherwise(pl.lit(""))


def stable_hash(keys: Sequence[str], seed: int, salt: str) -> np.ndarray:
    """uint64 per key from blake2b(seed, salt, key): the same on every machine and Python run."""
    key = f"{seed}:{salt}".encode()[:64]
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=key).digest(), "little") for k in keys),
        dtype=np.uint64, count=len(keys),
    )


def assign_split(ids: Sequence[str], speakers: Sequence[str], val_fraction: float, split_by: str,
                 seed: int) -> tuple[np.ndarray, list[str]]:
    """'train' / 'val' per utterance, and notes for the user.

    By utterance: exactly round(val_fraction * n) utterances with the smallest hashes, at least 1 and
    at most n - 1 when n >= 2 and val_fraction > 0. By speaker: whole speakers in hash order until
    they hold val_fraction of the utterances (at least one speaker, never all of them).
    """
    ids, speakers = np.asarray(ids, dtype=object), np.asarray(speakers, dtype=object)
    n, notes = len(ids), []
    split = np.full(n, SPLITS[0], dtype=object)
    if val_fraction <= 0 or n < 2:
        if val_fraction > 0:
            notes.append("a single utterance: nothing held out for validation")
        return split, notes
    if split_by == "utterance":
        order = np.lexsort((ids, stable_hash(ids.tolist(), seed, "split")))  # hash, then id on a tie
        n_val = min(max(round(val_fraction * n), 1), n - 1)
        split[order[:n_val]] = SPLITS[1]
        return split, notes
    names, counts = np.unique(speakers, return_counts=True)
    if len(names) < 2:
        notes.append(f"--split-by speaker needs two speakers or more, found {len(names)}: nothing held out")
        return split, notes
    order = np.lexsort((names, stable_hash(names.tolist(), seed, "split")))
    taken = np.cumsum(counts[order])
    n_speakers = min(max(int(np.searchsorted(taken, val_fraction * n)) + 1, 1), len(names) - 1)
    split[np.isin(speakers, names[order[:n_speakers]])] = SPLITS[1]
    return split, notes


def prompt_candidates_for(ids: Sequence[str], speakers: Sequence[str], splits: Sequence[str], max_prompts: int,
                          seed: int) -> Any:
    """polars List(Int32) column: per row, up to max_prompts other rows with its speaker and split.

    The rows are in their final order. Each (split, speaker) group is put in a seeded pseudo-random
    cycle; a row lists the rows that follow it in that cycle (sorted), so every row is a candidate
    about equally often. O(n * max_prompts).
    """
    import polars as pl
    import pyarrow as pa

    n = len(ids)
    if n == 0:
        return pl.Series("prompts", [], dtype=pl.List(pl.Int32))
    keys = pl.Series(splits, dtype=pl.String) + "\0" + pl.Series(speakers, dtype=pl.String)
    group = keys.rank("dense").to_numpy()  # (n,) one integer per (split, speaker)
    order = np.lexsort((np.arange(n), stable_hash(ids, seed, "prompts"), group))  # groups, cycle order
    group = group[order]
    bounds = np.flatnonzero(np.r_[True, group[1:] != group[:-1], True])
    order = order.astype(np.int32)
    rows, counts, values = [], [], []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        cycle = order[start:stop]  # (m,) rows of one group
        m, c = len(cycle), min(max_prompts, stop - start - 1)
        picks = cycle[(np.arange(m)[:, None] + np.arange(1, c + 1)[None, :]) % m]  # (m, c)
        rows.append(cycle)
        counts.append(np.full(m, c))
        values.append(np.sort(picks, axis=1).ravel())
    rows, counts, values = np.concatenate(rows), np.concatenate(counts), np.concatenate(values)  # group order
    # Move each row's block of values to its place in row order.
    row_counts = np.empty(n, np.int64)
    row_counts[rows] = counts
    offsets = np.r_[0, np.cumsum(row_counts)]  # (n + 1,) in row order
    shift = offsets[rows] - np.r_[0, np.cumsum(counts)[:-1]]  # (n,) new start - old start, per block
    in_row_order = np.empty_like(values)
    in_row_order[np.arange(len(values)) + np.repeat(shift, counts)] = values
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(in_row_order))
    return pl.Series("prompts", lists).cast(pl.List(pl.Int32))


def codebook_size_of(spec: dict[str, Any]) -> int:
    if "codebook_size" in spec:
        return int(spec["codebook_size"])
    if spec.get("name") in _KNOWN_CODEBOOK_SIZES:
        return _KNOWN_CODEBOOK_SIZES[spec["name"]]
    raise InputError(f"the codes' codec ({describe(spec)}) records no codebook_size")


def plan_shard_layout(lengths: np.ndarray, splits: Sequence[str], max_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard number, uint16 offset in that shard) per record; a new shard per split or when full."""
    shard, offset = np.empty(len(lengths), np.int32), np.empty(len(lengths), np.int64)
    current, position = 0, 0
    for i, length in enumerate(lengths.tolist()):
        if i and (splits[i] != splits[i - 1] or (position and position + length > max_elements)):
            current, position = current + 1, 0
        shard[i], offset[i] = current, position
        position += length
    return shard, offset


def plan_shards(codes: Sequence[str | os.PathLike[str]], phonemes: Sequence[str | os.PathLike[str]],
                chunks: Sequence[str | os.PathLike[str]] = (), options: ShardOptions = ShardOptions(),
                out: str | os.PathLike[str] = "shards") -> ShardPlan:
    """Read, join, filter, split and order everything; decide every record's shard and offset. No writes."""
    import polars as pl

    _check_options(options)
    report = ShardReport(out=Path(out))
    codes_df, codec = read_codes_folders(codes)
    text_df, tokenizer, text_settings = _read_text(phonemes, codes_df)
    df, speaker_column = _join_and_filter(codes_df, text_df, bool(phonemes), options, report)
    df = _with_weights(df, chunks, codec, report)
    df = _split_and_order(df, options, report)
    header, sample_rate = _header_template(df, codec, tokenizer)
    lengths = (df["text_len"] + header.n_codebooks * df["frames"]).to_numpy()  # (N,) uint16 values per record
    shard, offset = plan_shard_layout(lengths, df["split"].to_list(), max(1, int(options.shard_mb * 2**20) // 2))
    df = df.with_columns(shard=pl.Series(shard), offset=pl.Series(offset))
    _count_splits(df, report)
    report.shards = n_shards = int(shard[-1]) + 1
    meta = {
        "codec": codec,
        "tokenizer": tokenizer,
        "text_settings": text_settings,
        "n_codebooks": header.n_codebooks,
        "codebook_size": header.codebook_size,
        "text_vocab_size": header.text_vocab_size,
        "frame_rate": header.frame_rate,
        "sample_rate": sample_rate,
        "shards": _shards_meta(df["split"], shard, lengths),
        "split": {"val_fraction": options.val_fraction, "split_by": options.split_by, "seed": options.seed,
                  "speaker_depth": options.speaker_depth, "speaker_column": speaker_column},
        "filters": {"min_seconds": options.min_seconds, "max_seconds": options.max_seconds,
                    "max_text_tokens": options.max_text_tokens},
        "filtered": report.filtered,
        "only_in": report.only_in,
        "weights": {"chunks": [str(p) for p in chunks], "unscored": report.unscored},
        "max_prompts": options.max_prompts,
        "shard_mb": options.shard_mb,
        "inputs": {"codes": [str(p) for p in codes], "phonemes": [str(p) for p in phonemes]},
    }
    index = df.select(*formats.SHARD_INDEX_SCHEMA, "path", "tokens")
    return ShardPlan(index=index, header=header, n_shards=n_shards, meta=meta, report=report)


def _read_text(phonemes: Sequence[str | os.PathLike[str]], codes_df: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(DataFrame id, tokens[, speaker], tokenizer metadata, text settings) of the phonemes files; without
    any (audio only: continuation / in-fill training) every utterance has an empty text."""
    import polars as pl

    if phonemes:
        return read_phonemes_files(phonemes)
    return codes_df.select("id", tokens=pl.lit([], dtype=pl.List(pl.UInt16))), dict(NO_TEXT_TOKENIZER), {}


def _join_and_filter(codes_df: Any, text_df: Any, has_text: bool, options: ShardOptions,
                     report: ShardReport) -> tuple[Any, bool]:
    """The utterances kept (sorted by id) with their speaker and text_len, and whether a speaker column named
    them; ids in one input only and the filtered ones are counted per reason in ``report``."""
    import polars as pl

    only_codes = codes_df.join(text_df, on="id", how="anti")
    only_text = text_df.join(codes_df, on="id", how="anti")
    report.only_in = {"codes": len(only_codes), "phonemes": len(only_text)}
    df = codes_df.join(text_df, on="id", how="inner", suffix="_text")
    # The speaker: a phonemes 'speaker' column, else a manifest one, else folders of the id.
    speaker_columns = [c for c in ("speaker_text", "speaker") if c in df.columns]
    df = df.with_columns(speaker=pl.coalesce(*speaker_columns, speaker_from_id(pl.col("id"), options.speaker_depth)))
    df = df.with_columns(text_len=pl.col("tokens").list.len(),
                         npz_exists=pl.Series([os.path.isfile(p) for p in df["path"]], dtype=pl.Boolean))

    reason = (pl.when(~pl.col("npz_exists")).then(pl.lit(MISSING_CODES))
              .when((pl.col("text_len") == 0) & has_text).then(pl.lit(MISSING_TEXT))
              .when(pl.col("seconds") < options.min_seconds).then(pl.lit(TOO_SHORT))
              .when(pl.col("seconds") > options.max_seconds).then(pl.lit(TOO_LONG))
              .when(pl.col("text_len") > options.max_text_tokens).then(pl.lit(TEXT_TOO_LONG)))
    df = df.with_columns(reason=reason)
    dropped = pl.concat([
        only_text.select("id", reason=pl.lit(MISSING_CODES)),
        only_codes.select("id", reason=pl.lit(MISSING_TEXT)),
        df.filter(pl.col("reason").is_not_null()).select("id", "reason"),
    ]).sort("id")
    for why in REASONS:
        ids = dropped.filter(pl.col("reason") == why)["id"]
        report.filtered[why] = len(ids)
        if len(ids):
            report.examples[why] = ids.head(_EXAMPLES).to_list()
    df = df.filter(pl.col("reason").is_null()).sort("id")
    if df.is_empty():
        counts = ", ".join(f"{n} {why}" for why, n in report.filtered.items() if n) or "no common ids"
        raise InputError(f"no utterance left to shard ({counts}); nothing written")
    return df, bool(speaker_columns)


def _with_weights(df: Any, chunks: Sequence[str | os.PathLike[str]], codec: dict[str, Any],
                  report: ShardReport) -> Any:
    """A weight column: the mean chunk priority scaled to mean 1 (utterances without scores get the mean);
    1.0 everywhere without chunk scores."""
    import polars as pl

    if not chunks:
        return df.with_columns(weight=pl.lit(1.0))
    df = df.join(chunk_weights(chunks, codec), on="id", how="left")
    report.unscored = int(df["raw_weight"].null_count())
    mean = df["raw_weight"].mean()
    mean = 1.0 if mean is None or mean <= 0 else float(mean)
    return df.with_columns(weight=pl.col("raw_weight").fill_null(mean) / mean)


def _split_and_order(df: Any, options: ShardOptions, report: ShardReport) -> Any:
    """Split train/val, order the rows by (split, id) and list each row's prompt candidates."""
    import polars as pl

    split, report.notes = assign_split(df["id"].to_list(), df["speaker"].to_list(), options.val_fraction,
                                       options.split_by, options.seed)
    df = df.with_columns(split=pl.Series(split.tolist(), dtype=pl.String))
    df = df.with_columns(split_rank=pl.col("split").replace_strict(list(SPLITS), list(range(len(SPLITS)))))
    df = df.sort("split_rank", "id")
    return df.with_columns(prompt_candidates_for(df["id"].to_list(), df["speaker"].to_list(), df["split"].to_list(),
                                                 options.max_prompts, options.seed))


def _header_template(df: Any, codec: dict[str, Any], tokenizer: dict[str, Any]) -> tuple[formats.ShardHeader, int]:
    """The shard header (counts and shard number left to fill) and the sample rate: from the codec spec,
    the tokenizer and the first codes file."""
    first = formats.read_codes(df["path"][0])
    specials = tokenizer.get("specials", {})
    header = formats.ShardHeader(
        n_codebooks=first.n_codebooks, codebook_size=codebook_size_of(codec), text_vocab_size=tokenizer["vocab_size"],
        text_pad_id=specials.get("<pad>", formats.NO_TOKEN), text_bos_id=specials.get("<bos>", formats.NO_TOKEN),
        text_eos_id=specials.get("<eos>", formats.NO_TOKEN), text_unk_id=specials.get("<unk>", formats.NO_TOKEN),
        frame_rate=first.frame_rate, n_records=0, n_elements=0, meta={"codec": codec, "tokenizer": tokenizer},
    )
    return header, first.sample_rate


def _count_splits(df: Any, report: ShardReport) -> None:
    """Utterances, speakers and audio seconds per split, into ``report``."""
    import polars as pl

    for name in SPLITS:
        part = df.filter(pl.col("split") == name)
        report.utterances[name] = len(part)
        report.speakers[name] = part["speaker"].n_unique()
        report.seconds[name] = float(part["seconds"].sum())


def _shards_meta(splits: Any, shard: np.ndarray, lengths: np.ndarray) -> list[dict[str, Any]]:
    """Per shard: file name, split, records and uint16 values; ``shard`` (N,) never decreases down the rows."""
    n_shards = int(shard[-1]) + 1
    records, elements = np.bincount(shard), np.bincount(shard, weights=lengths)  # (n_shards,) each
    first_rows = np.searchsorted(shard, np.arange(n_shards))
    return [{"file": formats.shard_name(i), "split": splits[int(first_rows[i])], "records": int(records[i]),
             "elements": int(elements[i])} for i in range(n_shards)]


def _check_options(options: ShardOptions) -> None:
    if not 0.0 <= options.val_fraction < 1.0:
        raise InputError(f"--val-fraction {options.val_fraction}: expected 0 <= fraction < 1")
    if options.split_by not in SPLIT_BY:
        raise InputError(f"--split-by {options.split_by!r}: expected {' or '.join(SPLIT_BY)}")
    if options.min_seconds > options.max_seconds:
        raise InputError(f"--min-seconds {options.min_seconds} is above --max-seconds {options.max_seconds}")
    if options.shard_mb <= 0 or options.max_prompts < 0 or options.speaker_depth < 0:
        raise InputError("--shard-mb must be > 0, --max-prompts and --speaker-depth >= 0")


# ----------------------------------------------------------------------------- writing


def read_record(path: str, tokens: Sequence[int], frames: int, header: formats.ShardHeader) -> np.ndarray:
    """The shard record of one utterance (flat uint16), after checking its codes against the header: the
    codec that made them (as score-chunks checks it), their shape and their range."""
    item = formats.read_codes(path)
    check_same_codec(header.meta["codec"], item.codec, path)  # a file of another codec in a codes folder
    codes = item.codes  # (K, T) int16
    if codes.shape != (header.n_codebooks, frames):
        raise FormatError(f"{path}: codes of shape {tuple(codes.shape)}, expected ({header.n_codebooks}, {frames}) "
                          "(K of the first file, T from manifest.parquet)")
    if codes.size and int(codes.max()) >= header.codebook_size:
        raise FormatError(f"{path}: code {int(codes.max())} outside the codebook size {header.codebook_size}")
    return formats.shard_record(np.asarray(tokens, dtype=np.uint16), codes)


def write_shards(plan: ShardPlan, out: str | os.PathLike[str],
                 on_progress: Callable[[int], None] | None = None) -> ShardReport:
    """Write every shard of the plan (atomically, one by one), then index.parquet, then drop stale shards."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = plan.index
    total_bytes = 0
    for number, shard_meta in enumerate(plan.meta["shards"]):
        rows = index.filter(index["shard"] == number)
        header = replace(plan.header, n_records=shard_meta["records"], n_elements=shard_meta["elements"],
                         shard=number, meta={**plan.header.meta, "split": shard_meta["split"]})

        def records(rows: Any = rows, header: formats.ShardHeader = header) -> Any:
            for path, tokens, frames in zip(rows["path"], rows["tokens"], rows["frames"], strict=True):
                yield read_record(path, tokens, frames, header)
                if on_progress:
                    on_progress(1)

        path = out / formats.shard_name(number)
        formats.write_shard(path, header, records())
        total_bytes += path.stat().st_size
    formats.write_shard_index(out, index.drop("path", "tokens"), plan.meta)
    keep = {s["file"] for s in plan.meta["shards"]}
    for stale in out.glob("shard-*.bin"):
        if stale.name not in keep:
            stale.unlink()
    plan.report.bytes = total_bytes
    return plan.report


def build_shards(codes: Sequence[str | os.PathLike[str]], phonemes: Sequence[str | os.PathLike[str]],
                 out: str | os.PathLike[str], chunks: Sequence[str | os.PathLike[str]] = (),
                 options: ShardOptions = ShardOptions(), overwrite: bool = False,
                 on_progress: Callable[[int], None] | None = None) -> ShardReport:
    """``valle shard``: codes folders + phonemes files (+ chunk scores) -> ``out``/shard-*.bin + index.parquet.

    A finished output (index.parquet present) is skipped unless ``overwrite``. Every check runs
    before the first write, so a failing input leaves nothing behind.
    """
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (shards are written to a folder)")
    index_path = out / formats.SHARD_INDEX_NAME
    if index_path.exists() and not overwrite:
        return ShardReport(out=out, skipped=True)
    plan = plan_shards(codes, phonemes, chunks, options, out)
    # The old index goes before the first new shard replaces an old one: an index present = a complete output.
    index_path.unlink(missing_ok=True)
    _remove_dead_temporaries(out)
    report = write_shards(plan, out, on_progress)
    report.wall_seconds = time.perf_counter() - start
    return report


_TEMPORARY = re.compile(r"^\.(shard-\d+\.bin|index\.parquet)\.tmp-(\d+)$")  # formats.atomic_path names


def _remove_dead_temporaries(out: Path) -> None:
    """Temporary files of an earlier run killed outright (SIGKILL) would stay forever: remove them."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        match = _TEMPORARY.match(path.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(2)), 0)  # is the writer still alive?
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


# ----------------------------------------------------------------------------- reading


class ShardSet:
    """A finished ``valle shard`` output: its index, plus shards memory-mapped on first use (read-only).

    ``split`` keeps only "train" or "val" rows; row numbers (``record``, ``prompt_candidates``, the
    ``prompts`` column of ``index``) then count rows of that split. Opening checks every shard's
    header against the index: foreign files, other versions, truncated shards and index rows
    pointing past a shard's end raise FormatError naming the file.
    """

    def __init__(self, folder: str | os.PathLike[str], split: str | None = None):
        self.folder = Path(folder)
        index, self.meta = formats.read_shard_index(self.folder)
        self.index_path = self.folder / formats.SHARD_INDEX_NAME
        self.codec: dict[str, Any] = self.meta["codec"]
        self.tokenizer_meta: dict[str, Any] = self.meta["tokenizer"]
        self.text_settings: dict[str, Any] = self.meta.get("text_settings", {})
        self.n_codebooks = int(self.meta["n_codebooks"])
        self.codebook_size = int(self.meta["codebook_size"])
        self.text_vocab_size = int(self.meta["text_vocab_size"])
        self.frame_rate = float(self.meta["frame_rate"])
        self.paths = [self.folder / s["file"] for s in self.meta["shards"]]
        self.headers = [self._check_header(path) for path in self.paths]
        self._check_rows(index)
        self._bodies: dict[int, np.ndarray] = {}  # shard number -> memmap, shared by split views
        self._full = index
        self._select(split)

    def load_codec(self, device: str = "cpu") -> Any:
        """The codec of the shards' codes, built on ``device``; a fitted built-in codec is searched for where
        the codes were read from (the folders recorded by ``valle shard``), as ``decode`` searches."""
        from valle_cli.codecs import codec_from_spec

        search = [Path(p) for p in self.meta.get("inputs", {}).get("codes", [])]
        return codec_from_spec(self.codec, device, search=search)

    # -- opening checks

    def _check_header(self, path: Path) -> formats.ShardHeader:
        header = formats.read_shard_header(path)
        found = (header.n_codebooks, header.codebook_size, header.text_vocab_size)
        expected = (self.n_codebooks, self.codebook_size, self.text_vocab_size)
        if found != expected or not same_codec(header.meta.get("codec", {}), self.codec):
            raise FormatError(f"{path}: does not belong to {self.index_path} (K, codebook size, vocab {found} "
                              f"vs {expected}, or another codec)")
        return header

    def _check_rows(self, index: Any) -> None:
        """The index rows of each shard, in offset order, tile its body exactly: no gap, no overlap, nothing
        past its end, as many rows as its header has records."""
        shard = index["shard"].to_numpy()
        if len(shard) and (shard.min() < 0 or shard.max() >= len(self.paths)):
            raise FormatError(f"{self.index_path}: rows name shard {shard.max()}, but it lists {len(self.paths)}")
        offset = index["offset"].to_numpy().astype(np.int64)
        text_len, frames = (index[c].to_numpy().astype(np.int64) for c in ("text_len", "frames"))
        negative = np.flatnonzero((offset < 0) | (text_len < 0) | (frames < 0))
        if len(negative):
            raise FormatError(f"{self.index_path}: {self._row_name(index, negative[0])} has a negative offset, "
                              "text_len or frames")
        length = text_len + self.n_codebooks * frames  # (N,) uint16 values per record
        for number, header in enumerate(self.headers):
            rows = np.flatnonzero(shard == number)
            rows = rows[np.argsort(offset[rows], kind="stable")]
            starts, ends = offset[rows], offset[rows] + length[rows]
            end = int(ends.max()) if len(rows) else 0
            if end > header.n_elements:
                raise FormatError(f"{self.paths[number]}: {self.index_path.name} has rows past its end (up to {end} "
                                  f"values, the shard holds {header.n_elements})")
            previous_ends = np.r_[0, ends[:-1]]
            wrong = np.flatnonzero(starts != previous_ends)
            if len(wrong):
                i = wrong[0]
                how = "overlaps the record before it" if starts[i] < previous_ends[i] else "leaves a gap before it"
                raise FormatError(f"{self.paths[number]}: {self.index_path.name} {self._row_name(index, rows[i])} "
                                  f"starts at value {starts[i]}, where the record before it ends at {previous_ends[i]} "
                                  f"({how})")
            if end < header.n_elements or len(rows) != header.n_records:
                raise FormatError(f"{self.paths[number]}: {self.index_path.name} accounts for {len(rows)} records "
                                  f"and {end} values, the shard holds {header.n_records} and {header.n_elements}")

    @staticmethod
    def _row_name(index: Any, row: int) -> str:
        return f"row {int(row)} (id {index['id'][int(row)]!r})"

    def check_values(self) -> None:
        """Every text token and code of every record within the vocabularies the header gives (reads all
        shards once): a value out of range would otherwise fail deep inside the model's embeddings."""
        shard = self._full["shard"].to_numpy()
        for number in range(len(self.paths)):
            rows = np.flatnonzero(shard == number)
            if len(rows):
                self._check_shard_values(number, rows)

    def _check_shard_values(self, number: int, rows: np.ndarray) -> None:
        """The largest text token and code of each record of one shard (one pass over its body)."""
        index = self._full
        offset = index["offset"].to_numpy()[rows].astype(np.int64)
        text_len = index["text_len"].to_numpy()[rows].astype(np.int64)
        frames = index["frames"].to_numpy()[rows].astype(np.int64)
        body = self._body(number)
        # _check_rows made the records tile the body: segments alternate text, codes, text, codes, ...
        bounds = np.stack([offset, offset + text_len], axis=1).ravel()  # (2R,) text start, codes start
        has_values = np.stack([text_len > 0, frames > 0], axis=1).ravel()
        top = np.zeros(len(bounds), np.int64)
        top[has_values] = np.maximum.reduceat(body, bounds[has_values]) if has_values.any() else []
        text_top, codes_top = top[0::2], top[1::2]  # (R,) each
        for tops, limit, what in ((codes_top, self.codebook_size, "code"), (text_top, self.text_vocab_size,
                                                                           "text token")):
            bad = np.flatnonzero(tops >= limit)
            if len(bad):
                raise FormatError(f"{self.paths[number]}: {self._row_name(index, rows[bad[0]])} has {what} "
                                  f"{tops[bad[0]]}, outside [0, {limit - 1}] (K={self.n_codebooks}, codebook "
                                  f"size {self.codebook_size}, text vocabulary {self.text_vocab_size})")

    # -- split views

    def _select(self, split: str | None) -> None:
        import polars as pl

        if split is not None and split not in SPLITS:
            raise InputError(f"split {split!r}: expected {' or '.join(SPLITS)}")
        self.split = split
        full = self._full
        rows = np.arange(len(full)) if split is None else np.flatnonzero((full["split"] == split).to_numpy())
        view = full[rows] if split is not None else full
        # Prompt lists hold rows of the full index; a split view renumbers them (they never leave the split).
        counts = view["prompts"].list.len().to_numpy()
        values = view["prompts"].explode().drop_nulls().to_numpy().astype(np.int64)
        position = np.full(len(full), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        values = position[values]
        if (values < 0).any():
            raise FormatError(f"{self.index_path}: prompt candidates cross splits")
        self._prompt_offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
        self._prompt_values = values
        if split is not None:
            import pyarrow as pa

            lists = pa.LargeListArray.from_arrays(pa.array(self._prompt_offsets), pa.array(values.astype(np.int32)))
            view = view.with_columns(pl.Series("prompts", lists).cast(pl.List(pl.Int32)))
        self._index = view
        self._shard = view["shard"].to_numpy()
        self._offset = view["offset"].to_numpy()
        self._text_len = view["text_len"].to_numpy()
        self._frames = view["frames"].to_numpy()

    def select(self, split: str | None) -> ShardSet:
        """The same shards seen through another split ("train", "val", or None for all); shares the maps."""
        view = copy.copy(self)
        view._select(split)
        return view

    # -- records

    @property
    def index(self) -> Any:
        """polars DataFrame: id, speaker, split, shard, offset, text_len, frames, seconds, weight, prompts."""
        return self._index

    def __len__(self) -> int:
        return len(self._shard)

    def _body(self, number: int) -> np.ndarray:
        if number not in self._bodies:
            self._bodies[number] = formats.open_shard_body(self.paths[number], self.headers[number])
        return self._bodies[number]

    def record(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(text tokens uint16 (L,), codes uint16 (K, T)) of a row: read-only views into the memmap."""
        row = range(len(self))[row]  # negative rows count from the end; IndexError past it
        return formats.split_record(self._body(int(self._shard[row])), int(self._offset[row]),
                                    int(self._text_len[row]), self.n_codebooks, int(self._frames[row]))

    __getitem__ = record

    def prompt_candidates(self, row: int) -> np.ndarray:
        """Rows (int64 (n,), sorted) of other utterances by the same speaker in the same split."""
        row = range(len(self))[row]
        return self._prompt_values[self._prompt_offsets[row]:self._prompt_offsets[row + 1]]

    def __repr__(self) -> str:
        return (f"ShardSet({str(self.folder)!r}, split={self.split!r}: {len(self)} records, {len(self.paths)} "
                f"shard(s), K={self.n_codebooks}, {describe(self.codec)})")
