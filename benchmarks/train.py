#!/usr/bin/env python
"""Training throughput of the codec LM, on the current device.

    python benchmarks/train.py                                   # CUDA: small, base, full; else CPU: tiny, small
    python benchmarks/train.py --device cpu --arch llama --preset tiny --steps 5
    python benchmarks/train.py --preset full --batch-tokens 65536 --compile --attention flash
    python benchmarks/train.py --preset full --gradient-checkpointing --peak-tflops 312   # an A100

For every requested arch (transformer, llama, mixtral) and preset this builds a ``CodecLM`` (8
codebooks of 1024 codes, a text vocabulary of 256; mixtral with ``--moe-experts`` experts, top
``--moe-top-k``) and times full optimizer steps as ``valle train`` runs them: forward and backward
under bf16 autocast on CUDA (fp32 on CPU), gradient clipping, the NaN guard's finite check (the
loop's one host sync per step), an AdamW step (``training.loop.build_optimizer``) and zero_grad.
``--warmup`` untimed steps come first. With ``--compile`` the compiled model also runs every timed
batch once untimed before the timing (the warmup column then holds the compilation):
dynamo specialises on the batch size and on the tasks present in a batch, so a new combination
recompiles (up to its recompile limit, then that code runs eagerly, as it would in ``valle train``).

The batches are synthetic but shaped like real ones: utterances of 3-10 s at 75 frames/s with ~14
text tokens/s, a 3-6 s prompt cropped from another utterance, tasks drawn by ``tasks.draw_examples``
and laid out by ``tasks.collate``. Like the training sampler, utterances of one duration bucket are
packed greedily while ``rows * longest cost`` stays within ``--batch-tokens`` padded tokens (the cost
counts the longest prompt, so real batches come out a little smaller). Every configuration trains
on the same batches.

Columns: parameters of the whole model, real (unpadded) tokens per second, mean step time, peak
memory and, on CUDA, the model FLOPs utilisation. Peak memory is ``torch.cuda.max_memory_allocated``
on CUDA; on CPU it is the process's peak resident set size (``ru_maxrss``), a rough figure that
never goes down, so a row shows the largest footprint of any configuration run so far.

MFU = tokens/s * ``flops_per_token(config, mean sequence length)`` / ``--peak-tflops``. Those FLOPs
count the backbone's matmuls only: 6 N for the forward and backward pass of its N weights (routed
MoE experts counted top-k times) plus 12 * layers * dim * sequence length for attention (PaLM,
appendix B; not halved for the causal mask). Embeddings, heads, padding and the recomputation of
gradient checkpointing are left out, so the figure is useful work, not what the hardware did.
``--peak-tflops`` defaults to 989, the dense bf16 peak of an H100 / H200 SXM.
Random weights and codes; the speed does not depend on them. No asserts.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from valle_cli.common import resolve_device
from valle_cli.data import tasks
from valle_cli.model.config import ARCHES, ATTENTION_BACKENDS, PRESETS, ModelConfig, preset
from valle_cli.model.valle import Batch, count_parameters, flops_per_token
from valle_cli.training.loop import TrainConfig, autocast_dtype, build_model, build_optimizer

N_CODEBOOKS, CODEBOOK_SIZE, TEXT_VOCAB = 8, 1024, 256
FRAME_RATE = 75.0  # codec frames per second
TEXT_RATE = 14.0  # text tokens per second of speech
SECONDS = (3.0, 10.0)  # utterance durations
N_BUCKETS = 8  # duration buckets of the packer


@dataclass
class Result:
    params: int
    rows: float  # mean utterances per batch
    seq_len: float  # mean real positions per row
    tokens_per_s: float
    step_ms: float
    warmup_s: float
    memory_gib: float
    mfu: float | None


# ----------------------------------------------------------------------------- synthetic batches


def random_utterance(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(text (L,), codes (K, T)) of a random utterance of 3-10 s."""
    return utterance(rng, float(rng.uniform(*SECONDS)))


def utterance(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    text = rng.integers(0, TEXT_VOCAB, max(1, round(seconds * TEXT_RATE)))
    codes = rng.integers(0, CODEBOOK_SIZE, (N_CODEBOOKS, max(1, round(seconds * FRAME_RATE))))
    return text, codes


def packed_records(rng: np.random.Generator, batch_tokens: int,
                   task_config: tasks.TaskConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Utterances of one duration bucket, added while rows * the longest cost fits in ``batch_tokens``."""
    width = (SECONDS[1] - SECONDS[0]) / N_BUCKETS
    low = SECONDS[0] + width * int(rng.integers(N_BUCKETS))
    prompt = math.ceil(task_config.prompt_seconds[1] * FRAME_RATE)  # the longest prompt
    records: list[tuple[np.ndarray, np.ndarray]] = []
    longest = 0
    while True:
        text, codes = utterance(rng, float(rng.uniform(low, low + width)))
        cost = len(text) + codes.shape[1] + prompt + 3  # train.sequence_costs: the sampler's padded-token cost
        if records and (len(records) + 1) * max(longest, cost) > batch_tokens:
            return records  # the first utterance always goes in, even over the budget (oversize="single")
        records.append((text, codes))
        longest = max(longest, cost)


def synthetic_batches(n: int, batch_tokens: int, seed: int = 0) -> list[tasks.SequenceBatch]:
    rng = np.random.default_rng(seed)
    task_config = tasks.TaskConfig()
    batches = []
    for _ in range(n):
        records = packed_records(rng, batch_tokens, task_config)
        prompts: list[np.ndarray | None] = [random_utterance(rng)[1] for _ in records]  # "another utterance"
        examples = tasks.draw_examples(records, prompts, rng, task_config, FRAME_RATE)
        batches.append(tasks.collate(examples, CODEBOOK_SIZE))
    return batches


# ----------------------------------------------------------------------------- one configuration


def model_config(arch: str, preset_name: str, args: argparse.Namespace) -> ModelConfig:
    moe = ({"moe_experts": args.moe_experts, "moe_top_k": args.moe_top_k, "moe_shared_expert": False}
           if arch == "mixtral" else {})  # HF Mixtral has no shared expert; flops_per_token must not count one
    return preset(preset_name, arch=arch, attention=args.attention, gradient_checkpointing=args.gradient_checkpointing,
                  n_codebooks=N_CODEBOOKS, codebook_size=CODEBOOK_SIZE, text_vocab_size=TEXT_VOCAB, **moe)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def bench(config: ModelConfig, batches: list[tasks.SequenceBatch], args: argparse.Namespace, compiled: bool) -> Result:
    """Warm up, then time ``args.steps`` optimizer steps of one configuration."""
    device = args.device
    train_config = TrainConfig()
    torch.manual_seed(0)
    model = build_model(config, train_config, device)
    optimizer = build_optimizer(model, train_config, device)
    dtype = autocast_dtype(train_config.precision, device)
    step_model = torch.compile(model, dynamic=True) if compiled else model
    on_device = [Batch.from_numpy(b, device) for b in batches]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    model.train()

    def step(batch: Batch) -> None:  # as in training.loop: autocast, backward, clip, NaN guard, AdamW, zero_grad
        with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            out = step_model(batch)
            out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.clip)
        # the loop's one host sync per step: the NaN guard's finite flag (the loss stays on the device)
        bool((torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed = on_device[args.warmup:]
    # Compiled, every batch of the timed set goes through once untimed too: dynamo guards on the batch
    # size (1 vs more) and on the tasks present, so new batches recompile; time the compiled graphs instead.
    warmup = on_device[:args.warmup] + (timed if compiled else [])
    start = time.perf_counter()
    for batch in warmup:
        step(batch)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start

    tokens = sum(b.tokens for b in timed)
    rows = sum(b.segment.shape[0] for b in timed)
    seq_len = tokens / rows
    tokens_per_s = tokens / seconds
    mfu = None
    if device.startswith("cuda"):
        mfu = tokens_per_s * flops_per_token(config, round(seq_len)) / (args.peak_tflops * 1e12)
    return Result(params=count_parameters(model)["total"], rows=rows / len(timed), seq_len=seq_len,
                  tokens_per_s=tokens_per_s, step_ms=seconds / len(timed) * 1e3, warmup_s=warmup_s,
                  memory_gib=peak_memory_gib(device), mfu=mfu)


def release(device: str) -> None:
    """Free what a finished (or failed) configuration left behind before the next one."""
    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the table


def describe(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 100 else text[:97] + "..."


def parse_args() -> argparse.Namespace:
    """The command line, with the device-dependent defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    parser.add_argument("--arch", action="append", choices=ARCHES, help="repeatable (default: all three)")
    parser.add_argument("--preset", action="append", choices=list(PRESETS),
                        help="repeatable (default: tiny, small on CPU; small, base, full on CUDA)")
    parser.add_argument("--batch-tokens", type=int, default=0, help="padded tokens per batch (0: 2000 CPU, 32768 CUDA)")
    parser.add_argument("--steps", type=int, default=0, help="timed optimizer steps (0: 5 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps first (-1: 2 CPU, 5 CUDA)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd model")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--moe-experts", type=int, default=8, help="routed experts of mixtral")
    parser.add_argument("--moe-top-k", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak bf16 TFLOP/s of the GPU, for MFU (989: H100 / H200 dense)")
    args = parser.parse_args()
    if args.steps < 0 or args.batch_tokens < 0:
        parser.error("--steps and --batch-tokens must be positive")
    args.device = resolve_device(args.device)
    cuda = args.device.startswith("cuda")
    args.arch = args.arch or list(ARCHES)
    args.preset = args.preset or (["small", "base", "full"] if cuda else ["tiny", "small"])
    args.batch_tokens = args.batch_tokens or (32768 if cuda else 2000)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup >= 0 else (5 if cuda else 2)
    return args


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    cuda = args.device.startswith("cuda")

    precision = autocast_dtype("auto", args.device) or torch.float32
    label = torch.cuda.get_device_name(args.device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {label}; torch {torch.__version__}; {str(precision).removeprefix('torch.')}; "
          f"attention {args.attention}{'; gradient checkpointing' if args.gradient_checkpointing else ''}")
    batches = synthetic_batches(args.warmup + args.steps, args.batch_tokens)
    timed = batches[args.warmup:]
    padded = sum(math.prod(b.shape) for b in timed) / len(timed)
    real = sum(b.tokens for b in timed) / len(timed)
    print(f"{args.steps} timed steps after {args.warmup} warmup; --batch-tokens {args.batch_tokens}: "
          f"{real:.0f} real / {padded:.0f} padded tokens per batch on average\n")

    memory = "peak GiB" if cuda else "maxrss GiB*"
    header = (f"{'arch':<12}{'preset':<7}{'mode':<8}{'params M':>9}{'rows':>6}{'seq':>6}{'tokens/s':>10}"
              f"{'step ms':>9}{'warmup s':>9}{memory:>12}")
    print(header + (f"{'MFU':>7}" if cuda else ""))
    for arch in args.arch:
        for preset_name in args.preset:
            for compiled in [False, True] if args.compile else [False]:
                row = f"{arch:<12}{preset_name:<7}{'compile' if compiled else 'eager':<8}"
                try:
                    r = bench(model_config(arch, preset_name, args), batches, args, compiled)
                except Exception as error:  # noqa: BLE001 - a failed configuration is a row of the table
                    row += f"  failed: {describe(error)}"
                else:
                    row += (f"{r.params / 1e6:>9.1f}{r.rows:>6.1f}{r.seq_len:>6.0f}{r.tokens_per_s:>10.0f}"
                            f"{r.step_ms:>9.1f}{r.warmup_s:>9.1f}{r.memory_gib:>12.2f}")
                    if r.mfu is not None:
                        row += f"{r.mfu * 100:>6.1f}%"
                release(args.device)
                print(row, flush=True)
    if not cuda:
        print("\n* ru_maxrss: the peak resident memory of the whole process so far (never goes down), a rough figure")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
