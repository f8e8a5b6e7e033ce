"""Rank failures under load, as clients see them: what a kill -9 costs, per scenario and repetition.

Starts a local server (1 prefill gang + 2 decode gangs of 2 ranks, `tiny` on CPU by default) and, for each
scenario, runs the same concurrent streams (half greedy, half seeded at 0.8; ignore_eos) once without a fault
and `--reps` times with one: a decode rank killed mid-stream, a prefill rank killed mid-prefill, and a "node"
(rank 0 of every decode gang: one machine of a multi-node layout, which leaves the role without a healthy gang)
killed mid-stream. Prints, per scenario: requests failed, outputs differing from the no-fault run (greedy and
seeded apart: seeded identity needs (seed, position) sampling noise), the added end-to-end latency of the
streams the dead ranks were serving (p50/p99, against the same stream without the fault), and the seconds the
role had no healthy gang. Peers, from their own documentation (not measured here): Ray Serve LLM fails every
request of the restarted gang; SGLang/vLLM elastic EP drop the failed rank's requests.

    python benchmarks/faults.py --streams 12 --reps 3
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _faults as F  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def scenario_kill(role: str, node: bool, streams: int):
    """The fault: waits for the moment (mid-stream for decode, mid-prefill for prefill), kills, times the outage."""
    async def fault(progress):
        if role == "decode":
            await F.wait_for(lambda: sum(progress) >= 4 * streams, 300)
            ranks = await asyncio.to_thread(F.rank_stats, "decode")
            victims = [s for s in ranks if s["rank"] == 0] if node else \
                [max(ranks, key=lambda s: s["num_requests"])]
        else:
            victims = (await F.wait_for(lambda: [s for s in F.rank_stats("prefill") if s["num_requests"] > 0], 300))[:1]
            await asyncio.sleep(0.2)
        dead = F.kill(victims)
        return dead, await F.outage(role, dead)
    return fault


def run_scenario(url: str, name: str, role: str, node: bool, streams: int, prompt_len: int, max_tokens: int,
                 reps: int, tag: int) -> dict:
    rows = {"resumed": 0, "failed": 0, "greedy_diff": 0, "seeded_diff": 0, "added": [], "outage": [], "requests": 0}
    for rep in range(reps):
        payloads = [F.body(i, p, max_tokens) for i, p in enumerate(F.prompts(streams, prompt_len, tag * 100 + rep))]
        # fault first: its prompts are in no cache, so prefills really compute; the reference follows on them
        before = F.resumed(url)
        got, (dead, outage) = asyncio.run(F.run_streams(url, payloads, scenario_kill(role, node, streams)))
        rows["resumed"] += F.resumed(url) - before
        asyncio.run(_recovered(role, dead, gangs=2 if role == "decode" else 1))  # the reference runs on every gang
        ref, _ = asyncio.run(F.run_streams(url, payloads))
        rows["requests"] += streams
        rows["failed"] += sum(F.failed(r) for r in got)
        rows["greedy_diff"] += sum(F.differs(g, r) for g, r in zip(got, ref) if not F.failed(g) and not g["seeded"])
        rows["seeded_diff"] += sum(F.differs(g, r) for g, r in zip(got, ref) if not F.failed(g) and g["seeded"])
        slowest = sorted(((g["end"] - g["start"]) - (r["end"] - r["start"]) for g, r in zip(got, ref)), reverse=True)
        # the streams the dead gang held: about half the decode streams (one of two gangs), else all of them
        rows["added"] += slowest[:streams // 2 if role == "decode" and not node else streams]
        rows["outage"].append(outage)
        print(f"  {name} rep {rep + 1}: killed pids {sorted(dead)}, failed {sum(F.failed(r) for r in got)}, "
              f"no healthy {role} gang for {outage:.1f}s", flush=True)
        asyncio.run(_settle())
    return rows


async def _recovered(role: str, dead: set[int], gangs: int):
    await F.wait_for(lambda: F.healthy_gangs(role, dead) >= gangs, 300, period_s=0.5)


async def _settle():
    try:
        await F.wait_for(lambda: not F.clean(), 120, period_s=0.5)
    except TimeoutError:
        print(f"  ranks still hold: {F.clean()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=1500)
    ap.add_argument("--scenarios", default="decode,prefill,node")
    args = ap.parse_args()

    from ray import serve

    from rayinfer.actors.cluster import ensure_ray, free_port
    from rayinfer.actors.server import APP_NAME, start
    from rayinfer.config import ServeConfig
    from rayinfer.config.serve import RoleConfig

    ensure_ray(num_cpus=16)
    url, _ = start(ServeConfig(port=free_port(), max_queue=4 * args.streams, decode=RoleConfig(num_gangs=2),
                               kv_transfer_timeout_s=2.0, resume_deadline_s=120.0))
    table = {"decode": ("decode rank killed mid-stream", "decode", False, 40),
             "prefill": ("prefill rank killed mid-prefill", "prefill", False, args.prefill_len),
             "node": ("node (rank 0 of both decode gangs)", "decode", True, 40)}
    results = {}
    try:
        for tag, key in enumerate(args.scenarios.split(","), 1):
            name, role, node, plen = table[key]
            t0 = time.time()
            results[name] = run_scenario(url, name, role, node, args.streams, plen, args.max_tokens, args.reps, tag)
            print(f"  ({time.time() - t0:.0f}s)", flush=True)
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
    print(f"\n{'scenario':36} {'failed':>9} {'greedy≠':>8} {'seeded≠':>8} {'added p50':>10} {'added p99':>10} "
          f"{'no gang s':>10} {'resumed':>8}")
    for name, r in results.items():
        half = r["requests"] // 2
        print(f"{name:36} {r['failed']:>4}/{r['requests']:<4} {r['greedy_diff']:>4}/{half:<3} {r['seeded_diff']:>4}/{half:<3}"
              f" {pct(r['added'], 0.5):>9.2f}s {pct(r['added'], 0.99):>9.2f}s {statistics.mean(r['outage']):>9.1f}s {r['resumed']:>8}")
    print("peers (documented, not measured here): Ray Serve LLM fails every request of the restarted gang; "
          "SGLang/vLLM elastic EP drop the dead rank's requests; ratio of failures: ours / theirs = "
          f"{sum(r['failed'] for r in results.values())} / all in-flight on the dead ranks")


if __name__ == "__main__":
    main()
