"""Serving benchmark: concurrent streaming clients against a real rayinfer server on 127.0.0.1.

Starts the server in this process (prefill + decode gangs, or colocated with --colocated), then
N concurrent clients each stream one completion over HTTP (SSE). Reports TTFT p50/p99, time per
output token (TPOT) p50/p99, output throughput, and the ratio to the offline engine's throughput
on the same prompts run in this same script.
Run: python benchmarks/serve.py [--model small] [--requests 32] [--prompt-len 128] [--output-len 64]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _stream import stream_completion  # benchmarks/ is the script's directory


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one(http, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    r = await stream_completion(http, model, prompt, max_tokens)
    tokens = r["usage"]["completion_tokens"]
    return r["ttft"], (r["seconds"] - r["ttft"]) / max(tokens - 1, 1), tokens


async def _clients(url: str, model: str, prompts: list[str], max_tokens: int):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as http:
        return await asyncio.gather(*(_one(http, model, p, max_tokens) for p in prompts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt length in bytes (= tokens for presets)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--colocated", action="store_true")
    args = ap.parse_args(argv)

    import random

    from rayinfer import LLM, SamplingParams
    from rayinfer.actors.cluster import free_port
    from rayinfer.actors.server import start, stop
    from rayinfer.config import ServeConfig

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]
    prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_len))[: args.prompt_len]
               for _ in range(args.requests)]
    offline = LLM(args.model, max_num_batched_tokens=4096)
    offline.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = offline.generate(prompts, SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True),
                            use_tqdm=False)
    offline_tps = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
    del offline

    config = ServeConfig(model=args.model, port=free_port(), disaggregated=not args.colocated,
                         max_queue=max(256, 2 * args.requests))
    url, started = start(config)
    try:
        asyncio.run(_clients(url, config.model_name, prompts[:2], 4))  # warm-up
        t0 = time.perf_counter()
        results = asyncio.run(_clients(url, config.model_name, prompts, args.output_len))
        wall = time.perf_counter() - t0
    finally:
        stop(started)
    ttft = [r[0] for r in results]
    tpot = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    topo = "colocated 1x2 mixed ranks" if args.colocated else "prefill 1x2 + decode 1x2 ranks"
    print(f"model={args.model} {topo}; {args.requests} concurrent streams, prompt {args.prompt_len}, "
          f"output {args.output_len} tokens")
    print(f"TTFT  p50 {1e3 * statistics.median(ttft):8.1f} ms   p99 {1e3 * _pct(ttft, 0.99):8.1f} ms")
    print(f"TPOT  p50 {1e3 * statistics.median(tpot):8.1f} ms   p99 {1e3 * _pct(tpot, 0.99):8.1f} ms")
    print(f"throughput: server {tokens / wall:.1f} output tok/s, offline engine (same prompts, same script) "
          f"{offline_tps:.1f} tok/s, ratio {tokens / wall / offline_tps:.2f}x")


if __name__ == "__main__":
    main()
