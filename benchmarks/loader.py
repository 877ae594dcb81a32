#!/usr/bin/env python
"""Throughput of batch planning (valle_cli.data.batching) and of reading batches from real shards.

    python benchmarks/loader.py [--n 100000] [--batch-tokens 20000] [--epochs 3] [--no-shards]

Part 1 plans epochs of a synthetic shard index of ``--n`` utterances with a LibriTTS-like length
distribution (log-normal seconds, median 5 s, 0.5-30 s; 75 codec frames/s; ~14 phonemes/s;
sequence cost = text + frames + 4 specials) and prints batches/s and real tokens/s of planning,
the padding efficiency for several bucket counts (1 bucket = random batching), weighted epochs,
an 8-rank DDP split, and priority-window draws over a score-chunks-like table (54-frame chunks).

Part 2 (when ``valle_cli/shards.py`` has ``ShardSet``) builds real shards from an espeak corpus
(examples/make_corpus.py -> valle quantize with a tiny built-in codec -> valle phonemize ->
valle shard) and times planning + reading every record of each batch: batches/s and tokens/s end
to end. Without ``ShardSet`` it says so and stops after part 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from valle_cli.data.batching import PriorityWindowSampler, TokenBudgetBatchSampler, batch_stats

REPO = Path(__file__).resolve().parents[1]
FRAME_RATE = 75.0  # EnCodec 24 kHz
SPECIALS = 4  # <bos> <lang> <task> <eos>, about


def synthetic_index(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The columns of a shard index that the sampler needs, for n utterances."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(5.0), 0.55, n), 0.5, 30.0)  # [n] mean ~5.7 s like LibriTTS
    frames = np.ceil(seconds * FRAME_RATE).astype(np.int64)  # [n]
    text_len = np.ceil(seconds * 14.0 * rng.uniform(0.75, 1.25, n)).astype(np.int64)  # [n]
    weight = rng.gamma(2.0, 0.5, n)  # [n] chunk-priority-like weights
    weight[rng.uniform(size=n) < 0.02] = 0.0
    speaker = rng.integers(0, max(1, n // 150), n)  # ~150 utterances per speaker
    return {"frames": frames, "text_len": text_len, "lengths": text_len + frames + SPECIALS,
            "weight": weight, "speaker": speaker}


def time_epochs(sampler: TokenBudgetBatchSampler, lengths: np.ndarray, epochs: int) -> tuple[float, int, int, float]:
    """(seconds per epoch, batches per epoch, real tokens per epoch, padding efficiency) of planning."""
    start = time.perf_counter()
    plans = [sampler.plan_epoch(e) for e in range(epochs)]
    seconds = (time.perf_counter() - start) / epochs
    stats = batch_stats(plans[-1], lengths)
    return seconds, stats.batches, stats.real_tokens, stats.efficiency


def line(name: str, seconds: float, batches: int, tokens: int, efficiency: float | None = None) -> None:
    eff = f"  padding eff {efficiency:5.3f}" if efficiency is not None else ""
    print(f"  {name:<34} {batches / seconds:>10,.0f} batches/s  {tokens / seconds / 1e6:>8.1f} M tok/s"
          f"  ({batches:,} batches, {seconds * 1e3:7.1f} ms/epoch){eff}")


def bench_planning(n: int, batch_tokens: int, epochs: int) -> None:
    data = synthetic_index(n)
    lengths = data["lengths"]
    print(f"synthetic index: {n:,} utterances, mean {lengths.mean():.0f} tokens (p50 {np.median(lengths):.0f}, "
          f"p99 {np.quantile(lengths, 0.99):.0f}, max {lengths.max()}), batch_tokens {batch_tokens:,}")

    start = time.perf_counter()
    sampler = TokenBudgetBatchSampler(lengths, batch_tokens)
    print(f"  construction (buckets, fingerprint)   {(time.perf_counter() - start) * 1e3:7.1f} ms"
          f"   oversize items skipped: {len(sampler.oversize_items)}")
    line("unweighted, 16 buckets", *time_epochs(sampler, lengths, epochs))
    for buckets in (1, 8, 32):
        s = TokenBudgetBatchSampler(lengths, batch_tokens, n_buckets=buckets)
        label = "random batching (1 bucket)" if buckets == 1 else f"unweighted, {buckets} buckets"
        line(label, *time_epochs(s, lengths, epochs))
    s = TokenBudgetBatchSampler(lengths, batch_tokens, weights=data["weight"])
    line("weighted draw, 16 buckets", *time_epochs(s, lengths, epochs))
    s = TokenBudgetBatchSampler(lengths, batch_tokens, weights=data["weight"], speakers=data["speaker"])
    line("weighted + speaker-balanced", *time_epochs(s, lengths, epochs))

    # DDP: every rank plans the whole epoch and keeps its share, so per-rank planning costs the same.
    s = TokenBudgetBatchSampler(lengths, batch_tokens, rank=3, world_size=8)
    start = time.perf_counter()
    for e in range(epochs):
        s.set_epoch(e)
        mine = list(s)
    seconds = (time.perf_counter() - start) / epochs
    line("rank 3 of 8 (its own batches)", seconds, len(mine), batch_stats(mine, lengths).real_tokens)

    # Handing out planned batches (the per-step cost inside an epoch).
    s = TokenBudgetBatchSampler(lengths, batch_tokens)
    len(s)  # plan epoch 0
    start = time.perf_counter()
    handed = sum(1 for _ in s)
    print(f"  iterating a planned epoch             {handed / (time.perf_counter() - start):>10,.0f} batches/s")

    # Priority windows over a score-chunks-like table: 54-frame chunks of every utterance.
    frames = data["frames"]
    n_chunks = -(-frames // 54)  # [n]
    chunk_item = np.repeat(np.arange(n), n_chunks)  # [C]
    first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    chunk_start = (np.arange(len(chunk_item)) - first) * 54
    chunk_len = np.minimum(54, frames[chunk_item] - chunk_start)
    rng = np.random.default_rng(1)
    priority = rng.uniform(size=len(chunk_item))
    void = rng.uniform(size=len(chunk_item)) < 0.1
    start = time.perf_counter()
    windows = PriorityWindowSampler(chunk_item, chunk_start, chunk_len, priority, frames, 512, 32, void=void)
    built = time.perf_counter() - start
    steps = 2000
    start = time.perf_counter()
    real = sum(length for batch in (windows.batch(step) for step in range(steps)) for _, _, length in batch)
    seconds = time.perf_counter() - start
    print(f"  priority windows ({len(chunk_item):,} chunks, 32 x 512 frames): {steps / seconds:,.0f} batches/s, "
          f"{real / seconds / 1e6:.1f} M frames/s (construction {built * 1e3:.0f} ms)")


def valle(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "valle_cli", *args, "-q"], check=True, env=env)


def bench_shards(batch_tokens: int, epochs: int, speakers: int, per_speaker: int) -> None:
    try:
        shards = importlib.import_module("valle_cli.data.shards")
    except ImportError:
        shards = None
    if shards is None or not hasattr(shards, "ShardSet"):
        print("end to end: valle_cli/shards.py with ShardSet is not there yet; reading shards not timed")
        return
    sys.path.insert(0, str(REPO / "examples"))
    from make_corpus import make_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        make_corpus(work / "corpus", n_speakers=speakers, per_speaker=per_speaker, seed=0)
        valle("quantize", str(work / "corpus"), "-o", str(work / "codes"), "--codebooks", "2",
              "--codebook-size", "32", "--fit-seconds", "20")
        valle("phonemize", str(work / "corpus"), "-o", str(work / "phonemes.parquet"))
        valle("shard", str(work / "codes"), str(work / "phonemes.parquet"), "-o", str(work / "shards"))
        print(f"end to end: {speakers} x {per_speaker} espeak utterances -> shards in "
              f"{time.perf_counter() - start:.1f} s")

        shard_set = shards.ShardSet(work / "shards", split="train")  # rows renumbered within the split
        text_len = shard_set.index["text_len"].to_numpy()
        frames = shard_set.index["frames"].to_numpy()
        lengths = text_len + frames + SPECIALS  # [N]
        # A budget scaled to this small corpus, so that an epoch has a few dozen batches.
        budget = max(int(lengths.max()), min(batch_tokens, int(lengths.sum() // 40)))
        sampler = TokenBudgetBatchSampler(lengths, budget)
        shard_set.record(0)  # map the shard files outside the timing

        start = time.perf_counter()
        n_batches = real = records = done = 0
        while done < epochs or time.perf_counter() - start < 2.0:  # whole epochs, at least 2 s
            for batch in sampler:
                text, codes = collate([shard_set.record(i) for i in batch], shard_set.n_codebooks)
                real += int(lengths[batch].sum())
                records += len(batch)
                n_batches += 1
            done += 1
        seconds = time.perf_counter() - start
        print(f"  {len(shard_set)} train utterances (K={shard_set.n_codebooks}), budget {budget:,} tokens, "
              f"{done} epochs of {len(sampler)} batches: {n_batches / seconds:,.0f} batches/s, "
              f"{real / seconds / 1e6:.2f} M tok/s, {records / seconds:,.0f} records/s "
              f"(planning + memmap reads + padded collate)")


def collate(records: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a batch the way train would: text [B, L_max] and codes [B, K, T_max] int64 (0 = pad here)."""
    text = np.zeros((len(records), max(len(t) for t, _ in records)), dtype=np.int64)  # [B, L]
    codes = np.zeros((len(records), k, max(c.shape[-1] for _, c in records)), dtype=np.int64)  # [B, K, T]
    for b, (t, c) in enumerate(records):
        text[b, : len(t)] = t
        codes[b, :, : c.shape[-1]] = c
    return text, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="synthetic utterances")
    parser.add_argument("--batch-tokens", type=int, default=20_000, help="padded tokens per batch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per setting")
    parser.add_argument("--speakers", type=int, default=6, help="end to end: espeak voices")
    parser.add_argument("--per-speaker", type=int, default=20, help="end to end: utterances per voice")
    parser.add_argument("--no-shards", action="store_true", help="skip the end-to-end part")
    args = parser.parse_args()
    bench_planning(args.n, args.batch_tokens, args.epochs)
    if not args.no_shards:
        bench_shards(args.batch_tokens, args.epochs, args.speakers, args.per_speaker)


if __name__ == "__main__":
    main()
