#!/usr/bin/env python
"""The whole valle pipeline through imports (what the CLI verbs call), offline, on the CPU.

    python examples/library_api.py --out /tmp/valle-api              # a few CPU minutes
    python examples/library_api.py --out /tmp/api --speakers 3 --per-speaker 4 --steps 5   # a smoke run

corpus (espeak) -> fit the built-in codec -> quantize -> phonemize -> score chunks -> shard ->
train (tiny preset) -> sample (a prompt's voice) -> decode to out.wav. Each step is one library
call; the comments name the CLI verb that does the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("valle-api"))
    parser.add_argument("--speakers", type=int, default=4)
    parser.add_argument("--per-speaker", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--codebooks", type=int, default=8)
    parser.add_argument("--text", default="The clever fox found an old map.")
    args = parser.parse_args()

    from make_corpus import make_corpus

    from valle_cli import formats
    from valle_cli.codecs.audio import wav_bytes
    from valle_cli.codecs.builtin import BuiltinCodec, BuiltinCodecConfig
    from valle_cli.codecs.quantize import quantize_folder, sample_for_fit
    from valle_cli.data.chunks import score_codes_folder
    from valle_cli.data.shards import ShardOptions, build_shards
    from valle_cli.data.tasks import TaskConfig
    from valle_cli.generation.generate import GenerateConfig, SamplingParams
    from valle_cli.generation.synthesizer import Synthesizer
    from valle_cli.model.config import preset
    from valle_cli.text.phonemize import phonemize_corpus
    from valle_cli.training.loop import TrainConfig, train

    out = args.out
    corpus = out / "corpus"
    make_corpus(corpus, n_speakers=args.speakers, per_speaker=args.per_speaker, seed=0)  # examples/make_corpus.py

    # valle quantize --fit-codec corpus/ -o codec.safetensors; valle quantize corpus/ -o codes/
    config = BuiltinCodecConfig(n_codebooks=args.codebooks, codebook_size=256)
    BuiltinCodec.fit(sample_for_fit(corpus, config.sample_rate, 120, seed=0), config, seed=0).save(
        out / "codec.safetensors")
    codec = BuiltinCodec.load(out / "codec.safetensors")
    quantize_folder(corpus, out / "codes", codec)

    # valle phonemize corpus/ -o phonemes.parquet
    text = phonemize_corpus(str(corpus))
    formats.write_phonemes(out / "phonemes.parquet", text.df, text.tokenizer_meta, text.settings)

    # valle score-chunks codes/ -o chunks.parquet
    score_codes_folder(out / "codes").write(out / "chunks.parquet")

    # valle shard codes/ phonemes.parquet --chunks chunks.parquet -o shards/
    build_shards([out / "codes"], [out / "phonemes.parquet"], out / "shards", chunks=[out / "chunks.parquet"],
                 options=ShardOptions(val_fraction=0.1), overwrite=True)

    # valle train shards/ -o run/ --preset tiny
    report = train(out / "shards", out / "run", preset("tiny"), TaskConfig(),
                   TrainConfig(max_steps=args.steps, batch_tokens=4000, lr=2e-3, warmup_steps=min(30, args.steps),
                               eval_every=max(args.steps, 1), save_every=max(args.steps, 1), log_every=10),
                   device="cpu", overwrite=True)
    print(f"trained: loss {report.first_loss:.3f} -> {report.last_loss:.3f}", file=sys.stderr)

    # valle sample run/ --text ... --prompt corpus/spk00/spk00_0000.wav -o out.npz
    synth = Synthesizer.load(out / "run")
    prompt = sorted((corpus / "spk00").glob("*.wav"))[0]
    item = synth.tts(args.text, [prompt], GenerateConfig(ar=SamplingParams(temperature=0.8), max_frames=450), seed=0)
    formats.write_codes(out / "out.npz", item)

    # valle decode out.npz -o out.wav
    wav = synth.codec().decode([item.codes])[0]
    formats.atomic_write_bytes(out / "out.wav", wav_bytes(wav, synth.codec().sample_rate))
    print(f"{len(wav) / synth.codec().sample_rate:.2f} s of speech -> {out / 'out.wav'}", file=sys.stderr)


if __name__ == "__main__":
    main()
