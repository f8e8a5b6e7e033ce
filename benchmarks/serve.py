"""Serving benchmark: rayinfer's server topologies (and `vllm serve`) under concurrent streaming clients on 127.0.0.1.

Starts each topology in --topologies in turn in this process: `colocated` (mixed ranks, one 1-rank gang:
`rayinfer serve --colocated --decode-ep 1`) and `disaggregated` (the default prefill 1x2 + decode 1x2 ranks).
Without --vllm-python, N concurrent clients each stream one completion over HTTP (SSE); it reports TTFT and
time per output token (TPOT) p50/p99, output throughput, and the ratio to the offline engine's throughput on
the same prompts in this same script. With --vllm-python PY, `vllm serve` runs on the same checkpoint as a
third server (in --vllm-dtype, bfloat16 by default: vLLM's CPU MLA backend takes no float32 weights), and
every server is driven by the same client, `vllm bench serve` (random dataset, --prompt-len -> --output-len
tokens, --requests prompts, --concurrency in flight, --ignore-eos), run by PY; one table shows output tok/s,
TTFT mean/p50/p99, mean TPOT, failures, and the ratios to vLLM.
Run: python benchmarks/serve.py [--model small] [--requests 32] [--prompt-len 128] [--output-len 64]
     python benchmarks/serve.py --model v3mla --dtype bfloat16 --requests 64 --concurrency 16
            --vllm-python /path/to/vllm-venv/bin/python
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import _peer  # benchmarks/ is the script's directory
from _stream import stream_completion

TOPOLOGIES = ("colocated", "disaggregated")
COLUMNS = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "failed")


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


def parse_topologies(value: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    bad = [t for t in names if t not in TOPOLOGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"topologies {value!r}: each must be one of {', '.join(TOPOLOGIES)}")
    return names


def serve_config(args, topology: str, streams: int | None = None):
    from rayinfer.actors.cluster import free_port
    from rayinfer.config import ServeConfig

    config = ServeConfig(model=args.model, dtype=args.dtype, port=free_port(), disaggregated=topology != "colocated",
                         max_queue=max(256, 2 * (streams or args.requests)))
    return config.with_ep(decode=1) if topology == "colocated" else config


def describe(config) -> str:
    gangs = [f"{r} {config.role(r).num_gangs}x{config.role(r).ep_size}" for r in config.roles]
    return " + ".join(gangs) + " ranks"


def _offline_tps(args, prompts: list[str]) -> float:
    from rayinfer import LLM, SamplingParams

    offline = LLM(args.model, max_num_batched_tokens=4096, dtype=args.dtype)
    offline.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = offline.generate(prompts, SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True),
                            use_tqdm=False)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def _own_client(args, config, url: str, prompts: list[str], offline_tps: float) -> None:
    t0 = time.perf_counter()
    results = asyncio.run(_clients(url, config.model_name, prompts, args.output_len))
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    tpot = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    print(f"model={args.model} {describe(config)}; {args.requests} concurrent streams, prompt {args.prompt_len}, "
          f"output {args.output_len} tokens")
    print(f"TTFT  p50 {1e3 * statistics.median(ttft):8.1f} ms   p99 {1e3 * _pct(ttft, 0.99):8.1f} ms")
    print(f"TPOT  p50 {1e3 * statistics.median(tpot):8.1f} ms   p99 {1e3 * _pct(tpot, 0.99):8.1f} ms")
    print(f"throughput: server {tokens / wall:.1f} output tok/s, offline engine (same prompts, same script) "
          f"{offline_tps:.1f} tok/s, ratio {tokens / wall / offline_tps:.2f}x")


def _vllm_row(args, checkpoint: str, name: str, warmup: list[str], logs: str) -> dict:
    from rayinfer.actors.cluster import free_port

    server = _peer.Server(args.vllm_python, checkpoint, free_port(), args.vllm_dtype, name,
                          os.path.join(logs, "vllm-serve.log"))
    try:
        server.wait_ready()
        asyncio.run(_clients(server.url, name, warmup, 4))  # the same warm-up as rayinfer's servers
        return _peer.bench_serve(args.vllm_python, server.url, name, checkpoint, args,
                                 os.path.join(logs, "bench-vllm.log"))
    finally:
        server.stop()


def print_table(rows: list[tuple[str, dict]], reference: dict | None) -> None:
    w = max(len(label) for label, _ in rows)
    print(f"{'server':<{w}} {'out tok/s':>9} {'TTFT mean':>9} {'p50':>8} {'p99':>8} {'TPOT mean':>9} {'failed':>6}"
          + ("  tok/s vs vLLM  TTFT vs vLLM" if reference else ""))
    for label, r in rows:
        line = (f"{label:<{w}} {r['output_throughput']:9.1f} {r['mean_ttft_ms']:7.1f}ms {r['median_ttft_ms']:6.1f}ms "
                f"{r['p99_ttft_ms']:6.1f}ms {r['mean_tpot_ms']:7.1f}ms {r['failed']:6d}")
        if reference:
            line += (f"  {r['output_throughput'] / reference['output_throughput']:12.2f}x "
                     f"{r['mean_ttft_ms'] / reference['mean_ttft_ms']:12.2f}x")
        print(line)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every server's dtype")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="vllm serve's dtype (its CPU MLA backend takes no float32 weights) [bfloat16]")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (with --vllm-python)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt length in bytes (= tokens for presets)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--topologies", type=parse_topologies, default=TOPOLOGIES,
                    help=f"comma-separated, run in this order: {','.join(TOPOLOGIES)} (default: both)")
    ap.add_argument("--colocated", action="store_true", help="shorthand for --topologies colocated")
    ap.add_argument("--vllm-python", default=None,
                    help="a Python with vLLM installed: adds `vllm serve` and drives all servers with `vllm bench "
                         "serve` (default: vLLM skipped, this script's own streaming client)")
    args = ap.parse_args(argv)
    topologies = ("colocated",) if args.colocated else args.topologies
    if args.vllm_python:
        _peer.check_python(args.vllm_python)

    import random

    from rayinfer.actors.server import start, stop
    from rayinfer.model.presets import resolve_model_path

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]
    prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_len))[: args.prompt_len]
               for _ in range(args.requests)]
    offline_tps = None if args.vllm_python else _offline_tps(args, prompts)
    checkpoint = resolve_model_path(args.model)
    logs = tempfile.mkdtemp(prefix="rayinfer-serve-bench-")
    rows = []
    for topology in topologies:
        config = serve_config(args, topology)
        url, started = start(config)
        try:
            asyncio.run(_clients(url, config.model_name, prompts[:2], 4))  # warm-up
            if args.vllm_python:
                result = _peer.bench_serve(args.vllm_python, url, config.model_name, checkpoint, args,
                                           os.path.join(logs, f"bench-{topology}.log"))
                rows.append((f"rayinfer {topology} ({describe(config)})", result))
            else:
                _own_client(args, config, url, prompts, offline_tps)
        finally:
            stop(started)
    if not args.vllm_python:
        print("vllm serve skipped (no --vllm-python given)")
        return
    reference = _vllm_row(args, checkpoint, config.model_name, prompts[:2], logs)
    rows.append((f"vllm serve ({args.vllm_dtype}, one engine process)", reference))
    print(f"model={args.model} dtype={args.dtype} (vLLM {args.vllm_dtype}); vllm bench serve: random "
          f"{args.prompt_len} -> {args.output_len} tokens, {args.requests} prompts, concurrency {args.concurrency}, "
          f"ignore_eos; logs in {logs}")
    print_table(rows, reference)


if __name__ == "__main__":
    main()
