"""Serving-path benchmark: the same prompts through the offline engine and the served topologies, in one run.

For each of (a) the offline engine (`LLM.generate`, this process), (b) `rayinfer serve --colocated --decode-ep 1`
and (c) the default disaggregated topology, N concurrent streaming /v1/completions clients (greedy, ignore_eos)
send the same prompts; it prints output tok/s and its ratio to the offline engine, TTFT and inter-token latency
(ITL, the gap between consecutive SSE chunks carrying text, divided by the tokens they carry) percentiles, and
CPU seconds per 1,000 output tokens for each process kind (Serve's HTTP proxy, the ingress replica, the rank
replicas, the rest of Ray, and this process: the clients), read from /proc over the measured window only
(warm-up excluded), and the stages before each choice's first decoded token (rayinfer_first_token_phase_seconds:
the prefill call, the KV handoff, the first decode step). With --null-runner, a last row serves colocated ranks
that sample at once without a model: the path's own ceiling.
Run (timings: under the shared lock on a shared machine):
    flock /tmp/rayinfer-ray.lock python benchmarks/serve_path.py --model tiny --requests 64 --prompt-len 32 \
        --output-len 128 --null-runner
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import replace

from _stream import stream_completion
from serve import TOPOLOGIES, _offline_tps, describe, parse_topologies, serve_config

KINDS = ("proxy", "ingress", "rank", "ray-other", "client")


def _kind(cmdline: str) -> str | None:
    """The process kind of one Ray process from its title (Ray sets `ray::<actor class>...`), or None if not Ray's."""
    if "ProxyActor" in cmdline:
        return "proxy"
    if "ServeReplica" in cmdline:
        return "ingress" if ":ingress" in cmdline else "rank"
    if "ray" in cmdline and ("raylet" in cmdline or "gcs_server" in cmdline or "ray::" in cmdline
                             or "dashboard" in cmdline or "ray/_private" in cmdline):
        return "ray-other"
    return None


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (kind, user+system CPU seconds)} for every Ray process on this machine."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            kind = _kind(cmd)
            if kind is None:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(pid)] = (kind, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            continue
    t = os.times()
    out[os.getpid()] = ("client", t.user + t.system)  # the HTTP clients (and Ray's driver threads): this process
    return out


def cpu_by_kind(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each kind spent between two snapshots (processes that started in between count from zero)."""
    spent = dict.fromkeys(KINDS, 0.0)
    for pid, (kind, seconds) in after.items():
        spent[kind] += seconds - before.get(pid, (kind, 0.0))[1]
    return spent


async def _stream(http, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: TTFT, per-token gaps after the first chunk, tokens (from usage)."""
    r = await stream_completion(http, model, prompt, max_tokens)
    times, tokens = r["chunk_times"], r["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # A chunk may carry several tokens: spread the gaps over the tokens after the first.
    scale = len(gaps) / max(tokens - 1, 1)
    return {"ttft": r["ttft"], "itl": [g * scale for g in gaps] or [0.0], "tokens": tokens}


async def _clients(url: str, model: str, prompts: list[str], max_tokens: int) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as http:
        return await asyncio.gather(*(_stream(http, model, p, max_tokens) for p in prompts))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


PHASE = "rayinfer_first_token_phase_seconds"


def phase_totals(url: str) -> dict[str, list[float]]:
    """phase -> [seconds summed, choices] from the ingress's /metrics."""
    import httpx

    from rayinfer.report import parse_prometheus

    out: dict[str, list[float]] = {}
    for key, value in parse_prometheus(httpx.get(url + "/metrics", timeout=30).text).items():
        for part, slot in (("_sum{", 0), ("_count{", 1)):
            if key.startswith(PHASE + part):
                phase = key.split('phase="', 1)[1].split('"', 1)[0]
                out.setdefault(phase, [0.0, 0.0])[slot] = value
    return out


def phase_means(before: dict, after: dict) -> dict[str, float]:
    """Mean seconds per choice of each phase between two `phase_totals`."""
    means = {}
    for phase, (total, n) in after.items():
        t0, n0 = before.get(phase, [0.0, 0.0])
        if n > n0:
            means[phase] = (total - t0) / (n - n0)
    return means


def measure(url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    asyncio.run(_clients(url, model, prompts[:2], 4))  # warm-up
    phases = phase_totals(url)
    before = cpu_snapshot()
    t0 = time.perf_counter()
    results = asyncio.run(_clients(url, model, prompts, max_tokens))
    wall = time.perf_counter() - t0
    cpu = cpu_by_kind(before, cpu_snapshot())
    tokens = sum(r["tokens"] for r in results)
    return {"tps": tokens / wall, "tokens": tokens, "ttft": [r["ttft"] for r in results],
            "phases": phase_means(phases, phase_totals(url)),
            "itl": [g for r in results for g in r["itl"]], "cpu_per_1k": {k: 1e3 * v / tokens for k, v in cpu.items()}}


def report(label: str, row: dict, offline_tps: float) -> None:
    ttft, itl = row["ttft"], row["itl"]
    print(f"{label}: {row['tps']:.1f} output tok/s ({row['tps'] / offline_tps:.2f}x offline), {row['tokens']} tokens")
    print(f"  TTFT p50 {1e3 * statistics.median(ttft):7.1f} ms  p90 {1e3 * _pct(ttft, 0.9):7.1f} ms  "
          f"p99 {1e3 * _pct(ttft, 0.99):7.1f} ms")
    print(f"  ITL  p50 {1e3 * statistics.median(itl):7.1f} ms  p90 {1e3 * _pct(itl, 0.9):7.1f} ms  "
          f"p99 {1e3 * _pct(itl, 0.99):7.1f} ms")
    print("  CPU s / 1k tokens: " + "  ".join(f"{k} {v:.3f}" for k, v in row["cpu_per_1k"].items()))
    if row["phases"]:
        print("  to the first decoded token, mean per choice: " + "  ".join(
            f"{k} {1e3 * v:.1f} ms" for k, v in row["phases"].items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=64, help="concurrent streams")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt length in bytes (= tokens for presets)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--topologies", type=parse_topologies, default=TOPOLOGIES,
                    help=f"comma-separated, run in this order: {','.join(TOPOLOGIES)} (default: both)")
    ap.add_argument("--null-runner", action="store_true",
                    help="also serve colocated with ranks that sample at once without a model: the path's ceiling")
    ap.add_argument("--null-requests", type=int, default=256, help="concurrent streams of the null-runner row")
    ap.add_argument("--null-output-len", type=int, default=1024,
                    help="tokens per stream of the null-runner row (long: its streams' start-up does not dominate)")
    args = ap.parse_args(argv)

    from rayinfer.actors.server import start, stop

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]
    prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_len))[: args.prompt_len]
               for _ in range(args.requests)]
    offline_tps = _offline_tps(args, prompts)
    print(f"model={args.model}; {args.requests} concurrent streams, prompt {args.prompt_len} -> {args.output_len} "
          f"tokens, greedy, ignore_eos")
    print(f"offline engine (LLM.generate, this process): {offline_tps:.1f} output tok/s")
    runs = [(t, False, prompts) for t in args.topologies]
    if args.null_runner:
        runs.append(("colocated", True, [prompts[i % len(prompts)] for i in range(args.null_requests)]))
    for topology, null, batch in runs:
        output_len = args.null_output_len if null else args.output_len
        config = serve_config(args, topology, len(batch))
        if null:
            config = replace(config, null_runner=True, mixed=replace(config.mixed, max_num_seqs=len(batch)))
        url, started = start(config)
        try:
            row = measure(url, config.model_name, batch, output_len)
        finally:
            stop(started)
        what = (f"null runner ({describe(config)}, {len(batch)} streams x {output_len} tokens, no model): the path's "
                f"ceiling" if null
                else f"served {topology} ({describe(config)})")
        report(what, row, offline_tps)


if __name__ == "__main__":
    main()
