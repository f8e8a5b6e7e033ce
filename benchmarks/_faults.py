"""Rank faults against a running rayinfer server on 127.0.0.1: concurrent streams, a kill -9 while they run,
and what the clients saw (shared by benchmarks/faults.py and tests/test_faults.py).

Half the streams are greedy, half seeded at temperature 0.8; all ignore EOS and ask for logprobs and usage.
A run's result per stream: HTTP status, text, tokens (from the logprobs), finish reasons, in-band errors,
usage, and when it started and ended. The driver process must be connected to the server's Ray cluster
(rank pids come from the ranks' `stats`).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

SEEDED_TEMPERATURE = 0.8


def prompts(count: int, length: int, tag: int) -> list[list[int]]:
    rng = random.Random(tag)
    return [[rng.randrange(5, 261) for _ in range(length)] for _ in range(count)]


def body(i: int, prompt: list[int], max_tokens: int, model: str = "tiny") -> dict:
    sampled = i % 2 == 1
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": SEEDED_TEMPERATURE if sampled else 0, **({"seed": 1000 + i} if sampled else {}),
            "logprobs": 1, "stream_options": {"include_usage": True}}


async def stream_one(http, payload: dict, progress: list[int], i: int) -> dict:
    out = {"status": None, "text": "", "tokens": [], "finish": [], "errors": [], "usage": None,
           "seeded": "seed" in payload, "start": time.monotonic(), "end": None}
    try:
        async with http.stream("POST", "/v1/completions", json=payload) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["errors"].append(chunk["error"].get("message"))
                elif chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                for c in chunk.get("choices") or ():
                    out["text"] += c["text"]
                    out["tokens"] += (c.get("logprobs") or {}).get("tokens") or []
                    progress[i] = len(out["tokens"])
                    if c.get("finish_reason"):
                        out["finish"].append(c["finish_reason"])
    except Exception as e:  # noqa: BLE001 - a broken connection is a failed request, counted as such
        out["errors"].append(f"{type(e).__name__}: {e}")
    out["end"] = time.monotonic()
    return out


async def run_streams(url: str, payloads: list[dict], fault=None) -> tuple[list[dict], object]:
    """Runs every payload as a stream at once; `fault(progress)` (async, optional) runs beside them and
    its result comes back with the streams'."""
    import httpx

    progress = [0] * len(payloads)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        tasks = [asyncio.create_task(stream_one(http, p, progress, i)) for i, p in enumerate(payloads)]
        injected = await fault(progress) if fault is not None else None
        return await asyncio.gather(*tasks), injected


def resumed(url: str) -> int:
    """Rank calls the ingress has resumed elsewhere so far (its /health says)."""
    import httpx

    return httpx.get(f"{url}/health", timeout=30).json()["resumed"]


def failed(r: dict) -> bool:
    """Not one whole stream: an error, no usage, or not exactly one finish reason of a whole output."""
    return r["status"] != 200 or bool(r["errors"]) or r["finish"] not in (["length"], ["stop"]) or r["usage"] is None


def _counts(usage: dict) -> tuple:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]  # cache hits may differ


def differs(r: dict, ref: dict) -> bool:
    return (r["text"], r["tokens"], _counts(r["usage"])) != (ref["text"], ref["tokens"], _counts(ref["usage"]))


def rank_stats(role: str) -> list[dict]:
    """What every rank of `role` that answers says about itself (a dead one does not answer)."""
    from ray import serve

    from rayinfer.actors.server import APP_NAME

    handle = serve.get_deployment_handle(role, app_name=APP_NAME)
    try:
        results = handle.broadcast("stats").results(timeout_s=30, return_exceptions=True)
    except Exception:  # noqa: BLE001 - Serve refuses a broadcast while the deployment has no live replica
        return []
    return [s for s in results if isinstance(s, dict)]


def healthy_gangs(role: str, dead_pids: set[int], ep_size: int = 2) -> int:
    """Gangs of `role` whose every rank answers and none of which was killed."""
    by_gang: dict[str, set[int]] = {}
    for s in rank_stats(role):
        by_gang.setdefault(s["gang_id"], set()).add(s["pid"])
    return sum(1 for pids in by_gang.values() if len(pids) == ep_size and not pids & dead_pids)


def kill(ranks: list[dict]) -> set[int]:
    for s in ranks:
        os.kill(s["pid"], signal.SIGKILL)
    return {s["pid"] for s in ranks}


async def wait_for(what, timeout_s: float, period_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while not (value := await asyncio.to_thread(what)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {getattr(what, '__name__', what)}")
        await asyncio.sleep(period_s)
    return value


async def outage(role: str, dead: set[int], timeout_s: float = 120.0) -> float:
    """Seconds from now until `role` has a healthy gang again (0 when one never went away)."""
    t0 = time.monotonic()
    await wait_for(lambda: healthy_gangs(role, dead) > 0, timeout_s, period_s=0.2)
    return time.monotonic() - t0


def clean(roles=("prefill", "decode")) -> list[tuple]:
    """(role, rank, pid, exports, KV objects, accepted KV, pages, requests) of every rank still holding any."""
    left = []
    for role in roles:
        stats = rank_stats(role)
        if not stats:
            left.append((role, "no rank answered"))
        for s in stats:
            held = (s["kv_exports"], s["kv_objects_alive"], s["kv_accepted_waiting"], s["kv_blocks_used"],
                    s["num_requests"])
            if any(held):
                left.append((role, s["rank"], s["pid"], *held))
    return left


async def settled(timeout_s: float) -> list[tuple]:
    """Waits up to `timeout_s` for every rank to hold nothing; -> what is still held then (`clean`)."""
    try:
        await wait_for(lambda: not clean(), timeout_s, period_s=0.5)
        return []
    except TimeoutError:
        return clean()
