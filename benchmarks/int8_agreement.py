#!/usr/bin/env python
"""What int8 weights cost in outputs: a trained model's greedy tokens with int8 weights against fp32.

    python benchmarks/int8_agreement.py work/speak/run work/speak/eval_heard/rows.csv --rows 16

For the first ``--rows`` rows of a sample manifest (``id|text|prompt``, as ``valle sample --manifest``
reads it; the prompt cropped to ``--prompt-seconds``) this loads the checkpoint twice, as fp32 and
as ``valle sample --quantize int8`` loads it, and decodes greedily (temperature 0, no filters):

1. AR, teacher-forced: the fp32 model's greedy level 0, fed through both models in one forward;
   the share of positions where int8's argmax is fp32's (codes and the stop token). This is the
   per-step agreement, free of the divergence that a single different token starts. A whole sequence
   is a product of many rows, so this measures the int8 weights dequantised (model/int8.py), not the
   bf16-activation kernel of the decode steps, which the free-running figures include.
2. AR, free-running: each model decodes on its own; rows whose codes are identical, the mean share
   of frames equal up to the first difference, and the lengths (frames) of both.
3. NAR, levels 1..K-1 from the fp32 level 0: the share of equal codes per level.

One thread, CPU. Prints figures; no asserts. The speed of int8 is in ``benchmarks/sample.py``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from valle_cli.data import tasks
from valle_cli.generation.generate import GenerateConfig, Request, SamplingParams, generate_ar, generate_nar
from valle_cli.generation.synthesizer import Synthesizer
from valle_cli.model.valle import Batch, CodecLM

GREEDY = SamplingParams(temperature=0.0)


def read_rows(manifest: Path, n: int) -> list[tuple[str, str, Path]]:
    with manifest.open(newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="|")][:n]
    return [(r["id"], r["text"], (manifest.parent / r["prompt"]).resolve()) for r in rows]


def teacher_forced_argmax(model: CodecLM, request: Request, level0: np.ndarray) -> np.ndarray:
    """(T + 1,) the AR head's argmax at every response position (the last one predicts the stop)."""
    k = model.config.n_codebooks
    codes = np.zeros((k, len(level0)), np.int64)
    codes[0] = level0
    example = tasks.Example(text=request.text, prompt=request.prompt, codes=codes, kind="ar", level=0)
    c = model.config
    batch = Batch.from_numpy(tasks.collate([example], c.codebook_size, c.unified_positions, c.task_after_prompt))
    hidden = model.hidden_states(batch)[0][0]  # (S, D)
    at = batch.targets[0] != tasks.IGNORE  # the response positions: the start id and the T codes
    return model.head_ar(hidden[at]).argmax(-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder or checkpoint")
    parser.add_argument("manifest", type=Path, help="id|text|prompt rows")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-seconds", type=float, default=3.0)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    fp32 = Synthesizer.load(args.run)
    int8 = Synthesizer.load(args.run, quantize="int8")
    config = GenerateConfig(mode="ar+nar", ar=GREEDY, nar=GREEDY,
                            max_frames=int(round(args.max_seconds * fp32.frame_rate)))
    rows = read_rows(args.manifest, args.rows)
    print(f"{args.run}: step {fp32.meta['step']}, {fp32.model.config.n_codebooks} codebooks; {len(rows)} rows "
          f"of {args.manifest}")
    forced, same_rows, prefix_share, lengths = [], 0, [], []
    nar_equal: dict[int, list[float]] = {}
    with torch.inference_mode():
        for _, text, prompt in rows:
            request = Request(text=fp32.text_tokens(text), prompt=fp32.prompt_codes([prompt], args.prompt_seconds))
            ref = generate_ar(fp32.model, [request], config)[0]  # (T,)
            got = generate_ar(int8.model, [request], config)[0]
            a, b = teacher_forced_argmax(fp32.model, request, ref), teacher_forced_argmax(int8.model, request, ref)
            forced.append(float((a == b).mean()))
            n = min(len(ref), len(got))
            diverge = int(np.argmax(ref[:n] != got[:n])) if (ref[:n] != got[:n]).any() else n
            same_rows += int(len(ref) == len(got) and diverge == n)
            prefix_share.append(diverge / max(len(ref), 1))
            lengths.append((len(ref), len(got)))
            ref_codes = generate_nar(fp32.model, [request], [ref], config)[0]  # (K, T)
            got_codes = generate_nar(int8.model, [request], [ref], config)[0]
            for level in range(1, ref_codes.shape[0]):
                nar_equal.setdefault(level, []).append(float((ref_codes[level] == got_codes[level]).mean()))
    print(f"AR teacher-forced top-1 agreement: {np.mean(forced):.4f} (rows: min {np.min(forced):.3f})")
    print(f"AR free-running: {same_rows}/{len(rows)} rows identical; frames equal until the first difference: "
          f"{np.mean(prefix_share):.3f} of the fp32 output on average")
    print("AR lengths fp32 -> int8 (frames): " + ", ".join(f"{x}->{y}" for x, y in lengths))
    print("NAR agreement by level (from the fp32 level 0): "
          + ", ".join(f"{level}: {np.mean(v):.4f}" for level, v in sorted(nar_equal.items())))


if __name__ == "__main__":
    main()
