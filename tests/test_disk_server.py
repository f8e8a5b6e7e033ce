"""The disk tier on a real local server (prefill + decode gangs of 2 CPU ranks on 127.0.0.1): prompt
pages outlive the server, a restarted server reuses them, and bad files change nothing."""
import os
import time

import openai
from ray import serve

from rayinfer import LLM, SamplingParams
from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig

PREFIX = "".join(f"line {i:04d}: the quick brown fox jumps over the lazy dog. " for i in range(25))[:1200]
PROMPTS = [PREFIX + f" Question {i}: what comes next?" for i in range(8)]


def _rank_stats(role: str) -> list[dict]:
    return serve.get_deployment_handle(role, app_name=APP_NAME).broadcast("stats").results(timeout_s=30)


def _serve_and_ask(directory: str) -> tuple[list[str], list[int], list[dict]]:
    """Starts a server on `directory`, sends the prompts one by one, waits for its page writes, stops it."""
    serve.shutdown()
    url, _ = start(ServeConfig(port=free_port(), disk_cache_dir=directory))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        texts, cached = [], []
        for p in PROMPTS:
            c = client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
            texts.append(c.choices[0].text)
            cached.append(c.usage.prompt_tokens_details.cached_tokens)
            assert c.usage.prompt_cache_hit_tokens == cached[-1]
        deadline = time.time() + 60
        while any(s["disk_pending_writes"] for s in _rank_stats("prefill")) and time.time() < deadline:
            time.sleep(0.2)
        stats = _rank_stats("prefill") + _rank_stats("decode")
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
    return texts, cached, stats


def test_a_restarted_server_reuses_the_prompt_pages_and_bad_files_change_nothing(ray_cluster, tmp_path):
    d = str(tmp_path / "kv")
    want = [o.text for o in LLM("tiny").generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0),
                                                 use_tqdm=False)]
    texts, cached, stats = _serve_and_ask(d)
    assert texts == want
    assert sum(s["disk_pages_written"] for s in stats) >= 18  # the shared 1,152-token prefix, and more
    texts, cached, stats = _serve_and_ask(d)  # a restart on the same directory
    assert texts == want and cached[0] >= 1152, cached
    assert sum(s["disk_hit_tokens"] for s in stats) >= 1152
    files = [os.path.join(d, f) for f in os.listdir(d)]
    for f in files:  # every file damaged
        data = bytearray(open(f, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(f, "wb").write(bytes(data))
    texts, cached, stats = _serve_and_ask(d)
    assert texts == want  # no errors either: every request above returned a completion
    assert sum(s["disk_corrupt_pages"] for s in stats) >= 1  # (pages rewritten since may be hits again)
