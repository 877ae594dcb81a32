"""Small synthetic shard sets for model and training tests: no audio, seconds to build.

Codes follow a learnable pattern (each utterance's level-0 codes count up from a start that
depends on its text; level l is level 0 shifted by l), so a tiny model can fit them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from valle_cli import formats
from valle_cli.data.shards import ShardOptions, build_shards

CODEC = {"name": "fake", "tag": "synthetic", "codebook_size": 32}
FRAME_RATE = 25.0


def make_shards(root: Path, n_speakers: int = 3, per_speaker: int = 4, n_codebooks: int = 3, codebook_size: int = 32,
                frames: tuple[int, int] = (20, 40), text_len: tuple[int, int] = (5, 12), vocab: int = 40,
                val_fraction: float = 0.2, seed: int = 0) -> Path:
    """root/codes (npz + manifest), root/phonemes.parquet, root/shards (valle shard output) -> root/shards."""
    rng = np.random.default_rng(seed)
    codes_dir = root / "codes"
    rows, text_rows = [], []
    spec = {**CODEC, "codebook_size": codebook_size}
    for s in range(n_speakers):
        for u in range(per_speaker):
            uid = f"spk{s:02d}/spk{s:02d}_{u:04d}"
            t = int(rng.integers(frames[0], frames[1] + 1))
            tokens = rng.integers(4, vocab, size=int(rng.integers(text_len[0], text_len[1] + 1)))
            start = int(tokens.sum()) % codebook_size
            level0 = (start + np.arange(t) * (1 + s % 2)) % codebook_size
            codes = np.stack([(level0 + level) % codebook_size for level in range(n_codebooks)]).astype(np.int16)
            path = codes_dir / f"{uid}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            formats.write_codes(path, formats.Codes(codes=codes, sample_rate=16000, frame_rate=FRAME_RATE,
                                                    codec=spec, seconds=t / FRAME_RATE))
            rows.append({"id": uid, "path": f"{uid}.npz", "frames": t, "seconds": t / FRAME_RATE,
                         "codec": json.dumps(spec, sort_keys=True), "source": ""})
            text_rows.append({"id": uid, "text": "x", "lang": "en", "phonemes": "x", "tokens": tokens.tolist()})
    formats.write_manifest(codes_dir, rows)
    tokenizer = {"kind": "phonemes", "vocab_size": vocab, "specials": {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3},
                 "symbols": [str(i) for i in range(vocab)]}
    formats.write_phonemes(root / "phonemes.parquet", pl.DataFrame(text_rows), tokenizer, {"lang": "en"})
    build_shards([codes_dir], [root / "phonemes.parquet"], root / "shards",
                 options=ShardOptions(min_seconds=0.1, val_fraction=val_fraction, seed=seed))
    return root / "shards"
