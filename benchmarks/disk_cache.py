"""Disk KV tier benchmark: a multi-turn chat replay against a real server restarted twice, with and without the tier.

Many conversations interleaved: each round sends every conversation's next turn (the conversation
so far plus a new user message) concurrently; the server is stopped and started again after the
first and second thirds of the rounds, the disk directory kept. Reports, with and without
`disk_cache_dir`: the input-token cache hit rate (beside DeepSeek's published 56.3%), TTFT p50/p90,
prompt tokens the prefill ranks computed, and the disk read bandwidth each prefill rank saw.
Run: python benchmarks/disk_cache.py [--conversations 8] [--turns 6] [--answer-len 48]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time

from _stream import stream_completion  # benchmarks/ is the script's directory

DEEPSEEK_HIT_RATE = 0.563  # 342B of 608B input tokens in a day, as published


async def _turn(http, prompt: str, max_tokens: int) -> dict:
    r = await stream_completion(http, "tiny", prompt, max_tokens)
    return {"ttft": r["ttft"], "text": r["text"], "prompt": r["usage"]["prompt_tokens"],
            "cached": r["usage"]["prompt_tokens_details"]["cached_tokens"]}


def _rank_stats(role: str) -> list[dict]:
    from ray import serve

    from rayinfer.actors.server import APP_NAME

    return serve.get_deployment_handle(role, app_name=APP_NAME).broadcast("stats").results(timeout_s=60)


def _replay(args, disk_dir: str | None) -> dict:
    """All rounds, in three server lives; returns per-turn results and per-life prefill-rank counters."""
    import httpx
    from ray import serve

    from rayinfer.actors.cluster import free_port
    from rayinfer.actors.server import APP_NAME, start
    from rayinfer.config import ServeConfig

    rng = random.Random(0)
    words = "the a of to and model cache page token disk rank prefill decode expert layer".split()
    convs = [f"System: you are assistant {c}. " + " ".join(rng.choice(words) for _ in range(args.system_words))
             for c in range(args.conversations)]
    lives = [range(0, args.turns // 3), range(args.turns // 3, 2 * args.turns // 3), range(2 * args.turns // 3,
                                                                                           args.turns)]
    turns, ranks = [], []
    for life in lives:
        serve.shutdown()
        url, _ = start(ServeConfig(port=free_port(), disk_cache_dir=disk_dir))
        try:
            for r in life:
                msgs = [f"\nUser {r}: " + " ".join(rng.choice(words) for _ in range(args.user_words)) + "\nAssistant:"
                        for _ in convs]

                async def round_(prompts):
                    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
                        return await asyncio.gather(*(_turn(http, p, args.answer_len) for p in prompts))

                results = asyncio.run(round_([c + m for c, m in zip(convs, msgs)]))
                convs = [c + m + res["text"] for c, m, res in zip(convs, msgs, results)]
                turns.extend(results)
            deadline = time.time() + 60  # let queued page writes land before the stop, as a graceful stop does
            while disk_dir and any(s["disk_pending_writes"] for s in _rank_stats("prefill")) and time.time() < deadline:
                time.sleep(0.2)
            ranks.extend(_rank_stats("prefill"))
        finally:
            serve.delete(APP_NAME)
            serve.shutdown()
    return {"turns": turns, "ranks": ranks}


def _summary(run: dict) -> dict:
    t, ranks = run["turns"], run["ranks"]
    ttft = sorted(x["ttft"] for x in t)
    read_s = sum(r.get("disk_read_seconds", 0.0) for r in ranks)
    return {"hit_rate": sum(x["cached"] for x in t) / sum(x["prompt"] for x in t),
            "ttft_p50": statistics.median(ttft), "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))],
            "prefill_computed": sum(r["prefill_tokens_computed"] for r in ranks),
            "disk_hit_tokens": sum(r.get("disk_hit_tokens", 0) for r in ranks),
            "disk_mb_s_per_rank": [r.get("disk_bytes_read", 0) / 1e6 / r["disk_read_seconds"]
                                   for r in ranks if r.get("disk_read_seconds")],
            "disk_read_s": read_s, "texts": [x["text"] for x in t]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6, help="rounds; the server restarts after each third")
    ap.add_argument("--system-words", type=int, default=120)
    ap.add_argument("--user-words", type=int, default=30)
    ap.add_argument("--answer-len", type=int, default=48)
    args = ap.parse_args(argv)

    from rayinfer.actors.cluster import ensure_ray

    ensure_ray(num_cpus=16)
    with tempfile.TemporaryDirectory() as d:
        with_tier = _summary(_replay(args, d))
    without = _summary(_replay(args, None))
    assert with_tier["texts"] == without["texts"], "the disk tier changed an output"
    print(f"multi-turn replay: {args.conversations} conversations x {args.turns} turns, 2 server restarts, "
          f"tiny preset, prefill + decode gangs of 2 CPU ranks")
    print(f"{'':28}{'with disk tier':>16}{'without':>12}")
    print(f"{'input-token hit rate':28}{with_tier['hit_rate']:>16.1%}{without['hit_rate']:>12.1%}"
          f"   DeepSeek production 56.3%: ratio {with_tier['hit_rate'] / DEEPSEEK_HIT_RATE:.2f}")
    print(f"{'prompt tokens computed':28}{with_tier['prefill_computed']:>16}{without['prefill_computed']:>12}"
          f"   ratio {with_tier['prefill_computed'] / max(without['prefill_computed'], 1):.2f}")
    for k in ("ttft_p50", "ttft_p90"):
        print(f"{k + ' (s)':28}{with_tier[k]:>16.3f}{without[k]:>12.3f}   ratio {with_tier[k] / without[k]:.2f}")
    bw = ", ".join(f"{x:.0f}" for x in with_tier["disk_mb_s_per_rank"]) or "none"
    print(f"disk hits: {with_tier['disk_hit_tokens']} tokens; read bandwidth per prefill rank per server life "
          f"(MB/s): {bw}")
    print("outputs identical with and without the tier: yes")


if __name__ == "__main__":
    main()
