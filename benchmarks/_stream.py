"""One streamed, greedy completion against a running rayinfer server, timed (shared by the serving benchmarks)."""
from __future__ import annotations

import json
import time


async def stream_completion(http, model: str, prompt: str, max_tokens: int) -> dict:
    """-> {"ttft": s, "seconds": s to the last chunk, "text": the completion, "usage": the final usage,
    "chunk_times": perf_counter() of each chunk carrying text}."""
    t0, text, usage, times = time.perf_counter(), "", {}, []
    async with http.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                text += chunk["choices"][0]["text"]
    return {"ttft": times[0] - t0, "seconds": time.perf_counter() - t0, "text": text, "usage": usage,
            "chunk_times": times}
