#!/usr/bin/env python
"""Generation speed of the codec LM (AR + NAR, NAR-len, batches), on the current device.

    python benchmarks/sample.py                                  # CPU: preset small, fp32; CUDA: preset full, bf16
    python benchmarks/sample.py --device cpu --seconds 3 10 --batch-sizes 1 4
    python benchmarks/sample.py --device cuda --preset full      # the goals below are for this
    python benchmarks/sample.py --device cuda --preset full --arch transformer --arch llama --compile

For every ``--arch`` this builds a randomly initialised ``CodecLM`` of ``--preset`` (8 codebooks of
1024 codes at 75 frames/s, a text vocabulary of 256; mixtral with ``--moe-experts`` experts) and
synthesises from one request of 40 text tokens and a 3 s prompt (225 frames of all 8 levels). The
stop logit of the AR head gets a bias of -1e4, so the AR pass always runs to ``max_frames``: every
output is exactly as long as asked. Sampling is seeded (temperature 1 for AR, greedy NAR, the
default demasking sampler with CFG 2.5 for NAR-len). One short untimed run per model comes first
(with ``--compile`` it holds the compilation).

1. AR + NAR with the KV cache, for outputs of ``--seconds`` (3, 10, 30 s: 225, 750, 2250 frames):
   level 0 autoregressively (frames/s and ms/frame, the prefill included), levels 1..7 in one
   NAR pass each, and the real-time factor RTF = (AR + NAR wall time) / audio seconds. The ratio of
   the AR ms/frame at the longest output to that at the shortest shows how flat the cached cost is.
2. The cache against no cache (``GenerateConfig(use_cache=False)``: the whole sequence recomputed
   for every frame, as e-c-k-e-r/vall-e does). First single AR steps with n frames already made
   (cached: one token against the KV cache; no cache: a forward of the whole prefix + n sequence;
   both with the mask, the AR head and the draw; the sampler column: the draw alone, from the head's
   logits). Then whole no-cache runs for every length up to ``--no-cache-max-seconds``; longer ones
   are skipped and estimated from the single steps (the integral of the piecewise-linear step cost
   over the n of a run). The speed-up is no-cache
   ms/frame over cached ms/frame of a run of the longest length (estimated where skipped).
3. NAR-len: ``--steps`` demasking rounds of level 0 at the given duration (no len prediction),
   then the NAR passes of levels 1..7; total time and RTF.
4. Batches: AR at ``--batch-seconds`` (10 s) for ``--batch-sizes`` rows (different random requests
   of the same lengths): ms per step, frames/s of one row and of all rows together.

Timers synchronise CUDA. ``--dtype`` bf16 / fp16 run under ``torch.autocast`` (bf16 is the default
on CUDA, as ``valle sample`` runs; fp32 on CPU). The AR step: ``--fixed-shape`` runs the fixed-shape
step eagerly (the whole cache under a mask), ``--compile`` compiles it with ``fullgraph=True`` (CUDA
graphs on a GPU; every new output length or batch size is run once untimed first, as it compiles a
new graph); prefill, NAR and no-cache passes stay eager. ``--quantize int8`` fuses the projections
and makes every linear layer weight-only int8, as ``valle sample --quantize int8``. On CPU the default
is one thread (``--threads``; 0 keeps torch's default): the decode step is made of small ops that gain
little from more, and on a shared machine OpenMP threads spinning on busy cores made them up to
100x slower. A configuration that fails prints its error as a row.

Goals: on one CPU core at the small preset, AR <= 2.5 ms/frame at 10 s and flat (<= 1.2x) from 1 s
to 30 s; NAR passes for 3 s <= half of what they took before the prefix was shared. On a GPU
(``--preset full``): AR ms/frame at 30 s / at 3 s <= 1.2; cache speed-up >= 30x at 30 s; RTF <= 0.1
for AR + NAR and <= 0.03 for NAR-len. Random weights: the speed does not depend on them (the
quality cost of int8 is measured on a trained model, ``benchmarks/int8_agreement.py``). No asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from valle_cli.common import resolve_device
from valle_cli.data import tasks
from valle_cli.generation.generate import (
    GenerateConfig,
    GenerateStats,
    Request,
    SamplingParams,
    generate_ar,
    generate_nar,
    generate_nar_len,
    sample_tokens,
)
from valle_cli.model.config import ARCHES, PRESETS, ModelConfig, preset
from valle_cli.model.load import QUANTIZE, prepare_for_decoding
from valle_cli.model.masks import decode_step_mask, prefix_bidirectional_mask
from valle_cli.model.valle import Batch, CodecLM, count_parameters

N_CODEBOOKS, CODEBOOK_SIZE, TEXT_VOCAB = 8, 1024, 256
FRAME_RATE = 75.0  # codec frames per second
TEXT_TOKENS = 40
PROMPT_FRAMES = 225  # 3 s
AR_SAMPLER = SamplingParams(temperature=1.0)


def frames_of(seconds: float) -> int:
    return max(1, round(seconds * FRAME_RATE))


# ----------------------------------------------------------------------------- setup


def model_config(arch: str, args: argparse.Namespace) -> ModelConfig:
    moe: dict[str, Any] = {}
    if arch == "mixtral":  # HF Mixtral has no shared expert
        moe = {"moe_experts": args.moe_experts, "moe_top_k": args.moe_top_k, "moe_shared_expert": False}
    return preset(args.preset, arch=arch, n_codebooks=N_CODEBOOKS, codebook_size=CODEBOOK_SIZE,
                  text_vocab_size=TEXT_VOCAB, **moe)


def build_model(config: ModelConfig, device: str, seed: int) -> CodecLM:
    """Random weights; the stop token never wins, so AR always runs to max_frames."""
    torch.manual_seed(seed)
    model = CodecLM(config).to(device).eval()
    with torch.no_grad():
        model.head_ar.bias[config.codebook_size] = -1e4
    return model


def make_requests(n: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(text=rng.integers(0, TEXT_VOCAB, TEXT_TOKENS),
                    prompt=rng.integers(0, CODEBOOK_SIZE, (N_CODEBOOKS, PROMPT_FRAMES))) for _ in range(n)]


def autocast_context(device: str, dtype: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if dtype == "fp32":
        return contextlib.nullcontext
    low = torch.bfloat16 if dtype == "bf16" else torch.float16
    return lambda: torch.autocast(device.split(":")[0], dtype=low)


@dataclass
class Bench:
    model: CodecLM
    device: str
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    seed: int
    fixed_shape: bool = False  # the fixed-shape AR step (GenerateConfig.fixed_shape)
    compile: bool = False  # compiled (fullgraph; implies the fixed shape)
    warmed: set[tuple[int, int]] = field(default_factory=set)  # compiled: (rows, frames) already run once

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed)
        return g

    @contextlib.contextmanager
    def timer(self, out: list[float]) -> Iterator[None]:
        """Appends the wall seconds of the block (CUDA synchronised on both ends) to ``out``."""
        self.sync()
        start = time.perf_counter()
        with torch.inference_mode(), self.autocast():
            yield
        self.sync()
        out.append(time.perf_counter() - start)

    def ar(self, requests: list[Request], frames: int, use_cache: bool = True) -> tuple[float, int, list[np.ndarray]]:
        """(seconds, AR steps, level-0 codes) of one AR pass of ``frames`` frames."""
        config = GenerateConfig(mode="ar+nar", max_frames=frames, ar=AR_SAMPLER, use_cache=use_cache,
                                fixed_shape=self.fixed_shape, compile=self.compile)
        if self.compile and use_cache and (len(requests), frames) not in self.warmed:
            with torch.inference_mode(), self.autocast():  # untimed: a new cache length compiles a new graph
                generate_ar(self.model, requests, config, self.generator())
            self.warmed.add((len(requests), frames))
        stats, times = GenerateStats(), []
        with self.timer(times):
            level0 = generate_ar(self.model, requests, config, self.generator(), stats)
        return times[0], stats.ar_frames, level0

    def nar(self, requests: list[Request], level0: list[np.ndarray]) -> float:
        times: list[float] = []
        with self.timer(times):
            generate_nar(self.model, requests, level0, GenerateConfig(), self.generator())
        return times[0]

    def nar_len(self, requests: list[Request], frames: int, steps: int) -> tuple[float, float]:
        """(demasking seconds, NAR seconds) at a given duration."""
        requests = [Request(r.text, r.prompt, r.lang, duration=frames) for r in requests]
        config = GenerateConfig(mode="nar-len", max_frames=frames, steps=steps)
        times: list[float] = []
        with self.timer(times):
            level0 = generate_nar_len(self.model, requests, config, self.generator())
        return times[0], self.nar(requests, level0)


# ----------------------------------------------------------------------------- single AR steps


def ar_sequence(bench: Bench, request: Request, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (1, S, D), positions (1, S) and validity (1, S) of an AR row with n frames made: S = prefix + n."""
    codes = np.random.default_rng(n).integers(0, CODEBOOK_SIZE, (N_CODEBOOKS, n))
    example = tasks.Example(text=request.text, prompt=request.prompt, codes=codes, kind="ar", level=0)
    batch = Batch.from_numpy(tasks.collate([example], CODEBOOK_SIZE, bench.model.config.unified_positions,
                                           bench.model.config.task_after_prompt),
                             bench.device)
    with torch.inference_mode(), bench.autocast():
        x = bench.model.embed(batch)
    return x, batch.positions, batch.segment != tasks.PAD


def timed_steps(bench: Bench, step: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed call."""
    times: list[float] = []
    with torch.inference_mode(), bench.autocast():
        step()
    for _ in range(repeats):
        with bench.timer(times):
            step()
    return sorted(times)[len(times) // 2]


def step_costs(bench: Bench, request: Request, n: int, repeats: int) -> tuple[float, float, float]:
    """(cached, no-cache, sampler) seconds of the AR step that makes frame n + 1: mask, backbone, head, draw;
    the sampler alone is the draw from the head's logits (``sample_tokens``)."""
    model, stop = bench.model, CODEBOOK_SIZE
    x, positions, valid = ar_sequence(bench, request, n)
    s = x.shape[1]
    generator = bench.generator()

    def finish(h: torch.Tensor) -> None:
        sample_tokens(model.head_ar(h).float(), AR_SAMPLER, generator, stop=stop)

    with torch.inference_mode(), bench.autocast():  # the cache holds the first s - 1 tokens
        cache = model.backbone.new_cache(1, s, bench.device, x.dtype)
        causal = torch.full((1,), s - 1, device=bench.device)
        model.backbone(x[:, :-1], positions[:, :-1], prefix_bidirectional_mask(valid[:, :-1], causal), cache=cache)

    def cached() -> None:
        mask = decode_step_mask(valid, 1)
        finish(model.backbone(x[:, -1:], positions[:, -1:], mask, cache=cache).hidden[:, 0])
        cache.crop(s - 1)

    bidir_start = torch.full((1,), s, device=bench.device)

    def recompute() -> None:
        mask = prefix_bidirectional_mask(valid, bidir_start)
        finish(model.backbone(x, positions, mask).hidden[:, -1])

    with torch.inference_mode(), bench.autocast():
        logits = model.head_ar(x[:, -1]).float()  # (1, V + 1)

    def sampler() -> None:
        sample_tokens(logits, AR_SAMPLER, generator, stop=stop)

    return (timed_steps(bench, cached, repeats * 4), timed_steps(bench, recompute, repeats),
            timed_steps(bench, sampler, repeats * 4))


def run_estimate(costs: dict[int, float], frames: int) -> float:
    """Seconds of a no-cache run of ``frames`` steps: the step cost, piecewise linear in n, summed over n < frames."""
    ns = sorted(costs)
    grid = np.arange(frames)
    return float(np.interp(grid, ns, [costs[n] for n in ns]).sum())


# ----------------------------------------------------------------------------- the sections


def fmt_error(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]


def recover(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def section_ar_nar(bench: Bench, seconds: list[float]) -> dict[int, float]:
    """AR + NAR with the cache; returns cached AR seconds per frame by frames."""
    print("1. AR (level 0, KV cache) + NAR (levels 1..7), batch 1")
    print(f"{'audio':>7}{'frames':>8}{'AR s':>9}{'AR frames/s':>13}{'AR ms/frame':>13}{'NAR s':>8}"
          f"{'total s':>9}{'RTF':>8}")
    requests = make_requests(1, bench.seed)
    per_frame: dict[int, float] = {}
    for sec in seconds:
        frames = frames_of(sec)
        row = f"{sec:>6g}s{frames:>8}"
        try:
            ar_s, steps, level0 = bench.ar(requests, frames)
            nar_s = bench.nar(requests, level0)
            per_frame[frames] = ar_s / steps
            row += (f"{ar_s:>9.2f}{steps / ar_s:>13.1f}{ar_s / steps * 1e3:>13.2f}{nar_s:>8.2f}"
                    f"{ar_s + nar_s:>9.2f}{(ar_s + nar_s) / sec:>8.3f}")
        except Exception as e:
            row += f"  {fmt_error(e)}"
            recover(bench.device)
        print(row)
    if len(per_frame) >= 2:
        lo, hi = min(per_frame), max(per_frame)
        print(f"AR ms/frame at {hi / FRAME_RATE:g} s / at {lo / FRAME_RATE:g} s: "
              f"{per_frame[hi] / per_frame[lo]:.2f} (goal <= 1.2)")
    return per_frame


def section_cache(bench: Bench, seconds: list[float], cached: dict[int, float], max_seconds: float,
                  repeats: int) -> None:
    print("\n2. KV cache vs no cache (the whole sequence recomputed every frame)")
    requests = make_requests(1, bench.seed)
    prefix = TEXT_TOKENS + 3 + PROMPT_FRAMES  # text, lang, task, prompt, the AR start position
    print(f"one AR step with n frames already made (sequence of {prefix} + n): ms")
    print(f"{'n':>7}{'cached':>10}{'no cache':>10}{'speed-up':>10}{'sampler':>10}")
    costs: dict[int, float] = {}
    for n in sorted({1, *(frames_of(s) for s in seconds)}):
        row = f"{n:>7}"
        try:
            c, full, sampler = step_costs(bench, requests[0], n, repeats)
            costs[n] = full
            row += f"{c * 1e3:>10.2f}{full * 1e3:>10.2f}{full / c:>9.1f}x{sampler * 1e3:>10.3f}"
        except Exception as e:
            row += f"  {fmt_error(e)}"
            recover(bench.device)
        print(row)

    print(f"whole AR runs: ms/frame (no cache measured up to {max_seconds:g} s, estimated from the steps above)")
    print(f"{'audio':>7}{'cached':>10}{'no cache':>10}{'estimate':>10}{'speed-up':>10}")
    speedup: tuple[float, float, bool] | None = None
    for sec in seconds:
        frames = frames_of(sec)
        row = f"{sec:>6g}s" + (f"{cached[frames] * 1e3:>10.2f}" if frames in cached else f"{'-':>10}")
        estimate = run_estimate(costs, frames) / frames if costs else math.nan
        measured = math.nan
        if sec <= max_seconds:
            try:
                ar_s, steps, _ = bench.ar(requests, frames, use_cache=False)
                measured = ar_s / steps
                row += f"{measured * 1e3:>10.2f}"
            except Exception as e:
                row += f"  {fmt_error(e)}"
                recover(bench.device)
                print(row)
                continue
        else:
            row += f"{'skipped':>10}"
        row += f"{estimate * 1e3:>10.2f}"
        if frames in cached:
            no_cache = estimate if math.isnan(measured) else measured
            row += f"{no_cache / cached[frames]:>9.1f}x" + (" (estimate)" if math.isnan(measured) else "")
            speedup = (sec, no_cache / cached[frames], math.isnan(measured))
        print(row)
    if speedup is not None:
        sec, ratio, estimated = speedup
        how = " (no cache estimated)" if estimated else ""
        print(f"speed-up of the cache at {sec:g} s: {ratio:.1f}x{how} (goal >= 30x at 30 s)")


def section_nar_len(bench: Bench, seconds: list[float], steps: int) -> None:
    print(f"\n3. NAR-len: {steps} demasking steps (CFG 2.5) at the given duration + NAR (levels 1..7), batch 1")
    print(f"{'audio':>7}{'frames':>8}{'demask s':>10}{'NAR s':>8}{'total s':>9}{'RTF':>8}")
    requests = make_requests(1, bench.seed)
    for sec in seconds:
        frames = frames_of(sec)
        row = f"{sec:>6g}s{frames:>8}"
        try:
            demask_s, nar_s = bench.nar_len(requests, frames, steps)
            row += f"{demask_s:>10.2f}{nar_s:>8.2f}{demask_s + nar_s:>9.2f}{(demask_s + nar_s) / sec:>8.3f}"
        except Exception as e:
            row += f"  {fmt_error(e)}"
            recover(bench.device)
        print(row)


def section_batch(bench: Bench, sec: float, sizes: list[int]) -> None:
    frames = frames_of(sec)
    print(f"\n4. AR batches (KV cache) at {sec:g} s ({frames} frames)")
    print(f"{'batch':>7}{'AR s':>9}{'ms/step':>10}{'frames/s/row':>14}{'frames/s all':>14}")
    for b in sizes:
        row = f"{b:>7}"
        try:
            requests = make_requests(b, bench.seed)
            bench.ar(requests, 16)  # untimed: a new batch size may recompile a compiled step
            ar_s, steps, _ = bench.ar(requests, frames)
            row += f"{ar_s:>9.2f}{ar_s / steps * 1e3:>10.2f}{steps / ar_s:>14.1f}{b * steps / ar_s:>14.1f}"
        except Exception as e:
            row += f"  {fmt_error(e)}"
            recover(bench.device)
        print(row)


def warm_up(bench: Bench, use_nar_len: bool) -> float:
    """One short untimed run of every pass (with --compile: the compilation); seconds."""
    start = time.perf_counter()
    requests = make_requests(1, bench.seed)
    _, _, level0 = bench.ar(requests, 48)
    bench.nar(requests, level0)
    bench.ar(requests, 4, use_cache=False)
    if use_nar_len:
        bench.nar_len(requests, 48, 2)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--preset", choices=list(PRESETS), help="default: small on CPU, full on CUDA")
    parser.add_argument("--arch", action="append", choices=ARCHES, help="repeatable (default: transformer)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[3.0, 10.0, 30.0], help="output lengths")
    parser.add_argument("--steps", type=int, default=25, help="NAR-len demasking steps")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-seconds", type=float, default=10.0)
    parser.add_argument("--no-cache-max-seconds", type=float,
                        help="measure whole no-cache runs up to this output length (default: 3 on CPU, 30 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per single-step cost")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the fixed-shape AR step (fullgraph; CUDA graphs on a GPU)")
    parser.add_argument("--fixed-shape", action="store_true", help="the fixed-shape AR step, eager")
    parser.add_argument("--quantize", default="none", choices=list(QUANTIZE),
                        help="int8: fused projections and weight-only int8 linear layers (model.load)")
    parser.add_argument("--moe-experts", type=int, default=8, help="routed experts of mixtral")
    parser.add_argument("--moe-top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads (default: 1 on CPU; 0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["cache", "nar-len", "batch"],
                        help="leave sections out")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    args.preset = args.preset or ("full" if cuda else "small")
    if args.no_cache_max_seconds is None:
        args.no_cache_max_seconds = 30.0 if cuda else 3.0
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    seconds = sorted(set(args.seconds))
    label = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    step = "compiled fixed-shape" if args.compile else ("fixed-shape" if args.fixed_shape else "dynamic")
    print(f"device: {label}; torch {torch.__version__}; {args.dtype}; weights {args.quantize}; AR step {step}")
    print(f"request: {TEXT_TOKENS} text tokens, a {PROMPT_FRAMES / FRAME_RATE:g} s prompt ({PROMPT_FRAMES} frames "
          f"x {N_CODEBOOKS} levels of {CODEBOOK_SIZE} codes, {FRAME_RATE:g} frames/s); AR never stops early")

    total_start = time.perf_counter()
    for arch in args.arch or ["transformer"]:
        print(f"\n=== arch {arch}, preset {args.preset}")
        try:
            model = build_model(model_config(arch, args), device, args.seed)
            params = count_parameters(model)
            print(f"{params['total'] / 1e6:.1f}M parameters ({params['backbone'] / 1e6:.1f}M backbone)")
            prepare_for_decoding(model, args.quantize)
            bench = Bench(model, device, autocast_context(device, args.dtype), args.seed, args.fixed_shape,
                          args.compile)
            warm = warm_up(bench, "nar-len" not in args.skip)
            print(f"warm-up: {warm:.1f} s{' (compiling the decode step)' if args.compile else ''}\n")
        except Exception as e:
            print(fmt_error(e))
            recover(device)
            continue
        start = time.perf_counter()
        cached = section_ar_nar(bench, seconds)
        if "cache" not in args.skip:
            section_cache(bench, seconds, cached, args.no_cache_max_seconds, args.repeats)
        if "nar-len" not in args.skip:
            section_nar_len(bench, seconds, args.steps)
        if "batch" not in args.skip:
            section_batch(bench, args.batch_seconds, args.batch_sizes)
        print(f"\n{arch}: {time.perf_counter() - start:.0f} s")
        del model, bench
        recover(device)
    print(f"\ntotal: {time.perf_counter() - total_start:.0f} s")


if __name__ == "__main__":
    main()
