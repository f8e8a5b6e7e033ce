"""Hostile requests against a live server (`tiny`, on 127.0.0.1): how fast each is refused, and whether a
small request sent alongside still completes quickly.

The bodies are the ones issue #18 found: the poison request (`stop_token_ids` outside the vocabulary, with
`min_tokens`) and the fan-out body (4,000 prompts, n=16: 64,000 choices in ~20 KB). Prints, per case, the status
and seconds of the hostile request, the seconds of a small completion sent right after it, and whether every
rank is still up (the same gangs, none restarted). The peer figure is the small request alone, from this run.
Run: python benchmarks/hostile_requests.py [--colocated]
"""
from __future__ import annotations

import argparse
import asyncio
import time

POISON = {"prompt": "hi", "max_tokens": 4, "stop_token_ids": [99999], "min_tokens": 1}
FANOUT = {"prompt": ["hi"] * 4000, "n": 16, "max_tokens": 1}
SMALL = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


async def _timed(http, body: dict, timeout: float) -> tuple[int | str, float]:
    t0 = time.perf_counter()
    try:
        r = await http.post("/v1/completions", json=body, timeout=timeout)
        return r.status_code, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a timeout is the figure here
        return type(e).__name__, time.perf_counter() - t0


async def _case(url: str, model: str, hostile: dict) -> tuple:
    import httpx

    async with httpx.AsyncClient(base_url=url) as http:
        bad = asyncio.create_task(_timed(http, dict(hostile, model=model), 40))
        await asyncio.sleep(0.05)  # the small one arrives while the hostile one is being handled
        small = await _timed(http, dict(SMALL, model=model), 20)
        return await bad, small


def _ranks() -> list[tuple]:
    from ray import serve

    from rayinfer.actors.server import APP_NAME

    out = []
    for role in ("prefill", "decode", "mixed"):
        try:
            h = serve.get_deployment_handle(role, app_name=APP_NAME)
            out += sorted((role, s["pid"], s["gang_id"]) for s in h.broadcast("stats").results(timeout_s=30))
        except Exception:  # noqa: BLE001 - the role is not deployed
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--colocated", action="store_true", help="one mixed gang instead of prefill + decode")
    args = ap.parse_args()
    from rayinfer.actors.cluster import free_port
    from rayinfer.actors.server import start, stop
    from rayinfer.config import ServeConfig

    cfg = ServeConfig(port=free_port(), disaggregated=not args.colocated)
    url, started = start(cfg)
    try:
        warm = asyncio.run(_case(url, cfg.model_name, SMALL))  # first calls pay the routers' warm-up
        alone = asyncio.run(_case(url, cfg.model_name, SMALL))[1]
        before = _ranks()
        print(f"warm-up {warm[1][1]:.2f}s; small request alone: {alone[0]} in {alone[1]:.2f}s")
        for name, body in (("poison", POISON), ("fan-out", FANOUT)):
            (status, secs), (s_status, s_secs) = asyncio.run(_case(url, cfg.model_name, body))
            print(f"{name:8s}: {status} in {secs:.2f}s; small alongside: {s_status} in {s_secs:.2f}s "
                  f"({s_secs / alone[1]:.1f}x alone)")
        after = _ranks()
        print(f"ranks before {len(before)}, after {len(after)}, unchanged (no rank failed or restarted): "
              f"{before == after}")
    finally:
        stop(started)


if __name__ == "__main__":
    main()
