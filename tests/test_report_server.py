"""`rayinfer report` and `/metrics` on a real local server (prefill + decode gangs of 2 CPU ranks): the totals
equal the sums of the responses' usage, revenue and cost follow the price formulas, and the Prometheus text
carries only rayinfer's series with meaningful labels."""
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from ray import serve

from rayinfer.actors.cluster import free_port
from rayinfer.actors.server import APP_NAME, start
from rayinfer.config import ServeConfig
from rayinfer.report import parse_prometheus, total

SHARED = "A long shared system prompt that fills several KV pages so later requests hit the cache. " * 4


@pytest.fixture(scope="module")
def server(ray_cluster):
    serve.shutdown()
    url, _ = start(ServeConfig(port=free_port(), max_queue=64))
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


def _traffic(url: str, tag: str) -> dict:
    """Known traffic, plain and streamed, half of it behind a shared prefix; -> usage sums and KV read."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    sums = {"requests": 0, "prompt": 0, "cached": 0, "completion": 0, "kv": 0}

    def add(u):
        p, n = u.prompt_tokens, u.completion_tokens
        sums["requests"] += 1
        sums["prompt"] += p
        sums["cached"] += u.prompt_tokens_details.cached_tokens
        sums["completion"] += n
        sums["kv"] += n * p + n * (n - 1) // 2  # output token k was computed from p + k - 1 tokens

    for i in range(6):
        prompt = (SHARED if i % 2 else "") + f"{tag} question {i}: " + "why? " * (1 + i)
        add(client.completions.create(model="tiny", prompt=prompt, max_tokens=4 + i, temperature=0).usage)
        chunks = list(client.completions.create(model="tiny", prompt=prompt + " again", max_tokens=3 + i,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        add(chunks[-1].usage)
    return sums


def _report(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "rayinfer.cli", "report", "--json", *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _report_matching(url: str, sums: dict, *args: str) -> dict:
    """The report once the last streams' output tokens are counted (after their [DONE] reached the client)."""
    deadline = time.time() + 10
    while True:
        r = _report("--url", url, *args)
        if r["output_tokens"] == sums["completion"] or time.time() > deadline:
            return r
        time.sleep(0.2)


def _check(r: dict, sums: dict) -> None:
    assert (r["requests"], r["input_tokens"], r["cache_hit_tokens"], r["output_tokens"]) == (
        sums["requests"], sums["prompt"], sums["cached"], sums["completion"])
    assert r["cache_miss_tokens"] == sums["prompt"] - sums["cached"]
    assert r["kv_tokens_per_output_token"] == pytest.approx(sums["kv"] / sums["completion"])
    revenue = (sums["cached"] * 0.14 + (sums["prompt"] - sums["cached"]) * 0.55 + sums["completion"] * 2.19) / 1e6
    assert r["revenue_usd"] == pytest.approx(revenue)
    assert r["cost_usd"] == pytest.approx(r["gpu_hours"] * 2.0)
    assert r["cost_profit_margin"] == pytest.approx((r["revenue_usd"] - r["cost_usd"]) / r["cost_usd"])


def test_report_totals_equal_the_usage_served(server, tmp_path):
    url = server
    sums = _traffic(url, "first")
    assert sums["cached"] > 0  # the shared prefix was served from the prefix cache
    r = _report_matching(url, sums)
    _check(r, sums)
    print(f"\n[report] {json.dumps({k: v for k, v in r.items() if k != 'by_role'})}")
    # 4 ranks (a prefill and a decode gang of 2) the whole lifetime, counted from the first poll after start-up
    assert r["gangs_peak"] == 2 and r["by_role"]["prefill"]["gangs_peak"] == r["by_role"]["decode"]["gangs_peak"] == 1
    assert 0.5 * 4 * r["window_s"] / 3600 < r["gpu_hours"] <= 4 * r["window_s"] / 3600 * 1.001
    assert r["output_tokens_per_s_per_request"] > 0 and r["prefill_tokens_per_s_per_node"] > 0

    # --since: a window opened after the first traffic holds exactly the second
    opened = time.time()
    time.sleep(0.5)
    second = _traffic(url, "second")
    r2 = _report_matching(url, second, "--since", f"{time.time() - opened:.3f}",
                          "--gpu-hour-cost", "3", "--gpus-per-node", "2")
    assert (r2["input_tokens"], r2["output_tokens"]) == (second["prompt"], second["completion"])
    assert r2["cost_usd"] == pytest.approx(r2["gpu_hours"] * 3.0)

    # a saved scrape gives the lifetime totals
    text = httpx.get(url + "/metrics", timeout=30).text
    dump = tmp_path / "metrics.prom"
    dump.write_text(text)
    both = {k: sums[k] + second[k] for k in sums}
    _check(_report("--metrics", str(dump)), both)
    history = tmp_path / "history.json"
    history.write_text(httpx.get(url + "/metrics/history", timeout=30).text)
    _check(_report("--metrics", str(history), "--plot", str(tmp_path / "day.png")), both)
    assert (tmp_path / "day.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert httpx.get(url + "/metrics/history", params={"since": -1}, timeout=30).status_code == 400
    for bad in ("nan", "NaN", "inf", "-inf"):
        r = httpx.get(url + "/metrics/history", params={"since": bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "since", (bad, r.text)


def test_metrics_are_rayinfers_own_with_meaningful_labels(server):
    text = httpx.get(server + "/metrics", timeout=30).text
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert series and all(line.startswith("rayinfer_") for line in series), [s for s in series if "rayinfer_" != s[:9]]
    assert max(len(line) for line in series) < 200 and "WorkerId" not in text and "SessionName" not in text
    values = parse_prometheus(text)
    for role in ("prefill", "decode"):
        for rank in ("0", "1"):
            assert f'role="{role}"' in text and any(
                k.startswith("rayinfer_rank_kv_usage{") and f'role="{role}"' in k and f'rank="{rank}"' in k
                for k in values)
    assert total(values, "rayinfer_gangs") == 2
    assert total(values, "rayinfer_server_start_time_seconds") < time.time()
    for name in ("rayinfer_time_to_first_token_seconds_count", "rayinfer_time_per_output_token_seconds_count",
                 "rayinfer_ingress_queue_depth", "rayinfer_rank_seconds_total", "rayinfer_uptime_seconds"):
        assert any(k.partition("{")[0] == name for k in values), name
