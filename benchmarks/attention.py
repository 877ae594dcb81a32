#!/usr/bin/env python
"""Attention backends and cached decoding, on the current device.

    python benchmarks/attention.py                              # CUDA in bf16 when present, else CPU float32
    python benchmarks/attention.py --device cpu --lengths 256 512 --cached 100 500
    python benchmarks/attention.py --batch 8 --heads 16 --head-dim 128 --repeats 20

Part 1 times one causal forward of ``attend`` (q, k, v of shape (B, H, T, Dh)) for every backend
that can run here: math (the float32 reference), sdpa, and flash where flash-attn is installed on
CUDA. Part 2 times one decoded token of a ``preset("small")`` Transformer with N tokens already in
its static KV cache, against recomputing the whole N + 1 token sequence for that token (what a model
without a cache does). Random weights; the speed does not depend on them. No asserts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from valle_cli.errors import ValleError
from valle_cli.model.attention import attend, resolve_backend
from valle_cli.model.config import preset
from valle_cli.model.transformer import KVCache, Transformer


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Seconds per call, the median of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def available_backends(device: torch.device) -> list[str]:
    backends = ["math", "sdpa"]
    try:
        backends.append(resolve_backend("flash", device))
    except ValleError:
        pass
    return backends


def bench_attend(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    backends = available_backends(device)
    print(f"attend, causal, B={args.batch} H={args.heads} Dh={args.head_dim}, {dtype}: ms per forward")
    print(f"{'T':>6}" + "".join(f"{b:>10}" for b in backends))
    for t in args.lengths:
        q, k, v = (torch.randn(args.batch, args.heads, t, args.head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        row = f"{t:>6}"
        with torch.inference_mode():
            for backend in backends:
                try:
                    s = timed(partial(attend, q, k, v, causal=True, backend=backend), device, args.repeats)
                    row += f"{s * 1e3:>10.2f}"
                except torch.OutOfMemoryError:
                    row += f"{'oom':>10}"
                    torch.cuda.empty_cache()
        print(row)


def decode_step(model: Transformer, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, n: int) -> None:
    """Token n against the n cached ones, then forget it again so every call sees n cached tokens."""
    model(x[:, n:], pos[:, n:], cache=cache)
    cache.crop(n)


def bench_decode(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    config = preset("small", attention="auto")
    torch.manual_seed(0)
    model = Transformer(config).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    b = args.decode_batch
    print(f"\ndecode, preset small ({n_params / 1e6:.1f}M params), batch {b}, {dtype}: ms per token")
    print(f"{'cached':>7}{'static cache':>14}{'recompute':>12}{'speedup':>9}")
    with torch.inference_mode():
        for n in args.cached:
            x = torch.randn(b, n + 1, config.dim, device=device, dtype=dtype)
            pos = torch.arange(n + 1, device=device).expand(b, n + 1)
            cache = model.new_cache(b, n + 1, device, dtype)
            model(x[:, :n], pos[:, :n], cache=cache)
            cached = timed(partial(decode_step, model, x, pos, cache, n), device, args.steps, warmup=2)
            full = timed(partial(model, x, pos), device, max(args.steps // 4, 2))
            print(f"{n:>7}{cached * 1e3:>14.2f}{full * 1e3:>12.2f}{full / cached:>8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per attention case (0: 3 CPU, 20 CUDA)")
    parser.add_argument("--cached", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per cache size")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.repeats = args.repeats or (20 if device.type == "cuda" else 3)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {label}; torch {torch.__version__}\n")
    bench_attend(args, device, dtype)
    bench_decode(args, device, dtype)


if __name__ == "__main__":
    main()
