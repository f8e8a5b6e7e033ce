"""A compressed day against a local server whose decode gangs autoscale: gangs per role over time, the day's
`rayinfer report`, failed requests (goal 0), and the report's plot.

Users follow a day/night curve: at clock time t of a day lasting `--minutes`, the script keeps
night + (peak - night) * sin^2(pi t / day) greedy streams in flight (midnight at both ends, noon in the middle),
starting a new one whenever one ends. The decode role (gangs of 2 CPU ranks) may run 1 to 2 gangs, prefill
one fixed gang. Every few seconds a line says the users wanted, the streams in flight and the gangs each role
runs (`rayinfer_gangs`, from /metrics). At the end: the report, the ratio of average to peak gangs beside
DeepSeek's published 226.75 / 278 nodes, and the number of failed requests.
Run: python benchmarks/diurnal.py [--minutes 4] [--peak 12] [--night 1] [--output-len 120] [--plot diurnal.png]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time

from _stream import stream_completion  # benchmarks/ is the script's directory

DEEPSEEK_NODES_AVG, DEEPSEEK_NODES_PEAK = 226.75, 278


def users_wanted(t: float, day_s: float, night: int, peak: int) -> int:
    return round(night + (peak - night) * math.sin(math.pi * min(t, day_s) / day_s) ** 2)


def gangs(http_get, url: str) -> dict[str, int]:
    from rayinfer.report import parse_prometheus

    values = parse_prometheus(http_get(url + "/metrics", timeout=30).text)
    return {k.split('role="')[1].split('"')[0]: int(v) for k, v in values.items() if k.startswith("rayinfer_gangs{")}


async def day(url: str, model: str, args) -> tuple[int, int]:
    """Plays the day; -> (requests ended, requests failed)."""
    import httpx

    day_s = args.minutes * 60
    done = failed = 0
    running: set[asyncio.Task] = set()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=4 * args.peak)) as http:
        t0 = last_print = time.monotonic()
        n = 0
        while (t := time.monotonic() - t0) < day_s or running:
            for task in [x for x in running if x.done()]:
                running.discard(task)
                done += 1
                if task.exception() is not None or task.result()["usage"].get("completion_tokens") != args.output_len:
                    failed += 1
                    print(f"  FAILED: {task.exception() or task.result()['usage']!r}", flush=True)
            wanted = users_wanted(t, day_s, args.night, args.peak) if t < day_s else 0
            while len(running) < wanted:
                prompt = f"user {n} at {t:.0f}s: " + "tell me about the sea " * (1 + n % 5)
                running.add(asyncio.create_task(stream_completion(http, model, prompt, args.output_len)))
                n += 1
            if time.monotonic() - last_print >= args.every:
                last_print = time.monotonic()
                g = await asyncio.to_thread(gangs, httpx.get, url)
                print(f"t={t:6.1f}s ({24 * min(t, day_s) / day_s:4.1f}h)  users wanted {wanted:3d}  in flight "
                      f"{len(running):3d}  gangs " + "  ".join(f"{r}={g[r]}" for r in sorted(g)), flush=True)
            await asyncio.sleep(0.2)
    return done, failed


def report(url: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "rayinfer.cli", "report", "--url", url, *args], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"rayinfer report failed: {out.stderr.strip()}")
    return out.stdout


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--minutes", type=float, default=4.0, help="length of the compressed day")
    ap.add_argument("--peak", type=int, default=12, help="streams in flight at noon")
    ap.add_argument("--night", type=int, default=1, help="streams in flight at midnight")
    ap.add_argument("--output-len", type=int, default=120)
    ap.add_argument("--target", type=float, default=2.0, help="autoscaling target: requests in flight per rank")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between status lines")
    ap.add_argument("--plot", default="diurnal.png")
    args = ap.parse_args(argv)

    from rayinfer.actors.cluster import free_port
    from rayinfer.actors.server import start, stop
    from rayinfer.config import AutoscalingConfig, RoleConfig, ServeConfig

    decode = RoleConfig(ep_size=2, autoscaling=AutoscalingConfig(
        min_gangs=1, max_gangs=2, target_ongoing_requests=args.target, upscale_delay_s=2, downscale_delay_s=15,
        look_back_s=4, drain_timeout_s=120))
    config = ServeConfig(model=args.model, port=free_port(), decode=decode, max_queue=max(64, 4 * args.peak))
    url, started = start(config)
    try:
        print(f"model={args.model}: prefill 1 gang x 2 ranks, decode 1-2 gangs x 2 ranks (target {args.target} "
              f"requests/rank); a {args.minutes:g}-minute day, {args.night}-{args.peak} streams of "
              f"{args.output_len} tokens", flush=True)
        done, failed = asyncio.run(day(url, config.model_name, args))
        time.sleep(6)  # one more metrics sample after the last stream, so the report counts it
        print(report(url))
        r = json.loads(report(url, "--json", "--plot", args.plot))
        ours = r["gangs_avg"] / r["gangs_peak"] if r["gangs_peak"] else float("nan")
        print(f"average / peak gangs: here {r['gangs_avg']:.2f} / {r['gangs_peak']:g} = {ours:.2f}; DeepSeek's "
              f"nodes {DEEPSEEK_NODES_AVG} / {DEEPSEEK_NODES_PEAK} = {DEEPSEEK_NODES_AVG / DEEPSEEK_NODES_PEAK:.2f}; "
              f"ratio {ours / (DEEPSEEK_NODES_AVG / DEEPSEEK_NODES_PEAK):.2f}x")
        print(f"requests: {done} ended, {failed} failed; plot written to {args.plot}")
    finally:
        stop(started)


if __name__ == "__main__":
    main()
