"""Prometheus metrics through Ray's metrics system, and the ingress's `/metrics` view of them.

Ranks record per-rank gauges and counters (KV usage, queue, prefill and decode tokens computed,
KV transfers), tagged with role, rank and gang; the ingress records request-level metrics
(requests by endpoint and status, tokens in and out, cached tokens, TTFT, inter-token latency,
queue depth). Ray exports them from every node's metrics agent; `scrape_cluster` gathers the
`rayinfer_` series from all alive nodes so one `/metrics` endpoint shows the whole deployment.
"""
from __future__ import annotations

import asyncio

import ray
from ray.util.metrics import Counter, Gauge, Histogram

_RANK_TAGS = ("role", "rank", "gang")
_COUNTERS = {  # engine counter -> metric name
    "prefill_tokens_computed": "rayinfer_rank_prefill_tokens_total",
    "decode_tokens_computed": "rayinfer_rank_decode_tokens_total",
    "generation_tokens": "rayinfer_rank_generation_tokens_total",
    "kv_imported_tokens": "rayinfer_rank_kv_imported_tokens_total",
    "kv_exported_tokens": "rayinfer_rank_kv_exported_tokens_total",
    "num_preemptions": "rayinfer_rank_preemptions_total",
    "eplb_rebalances": "rayinfer_rank_eplb_rebalances_total",
    "disk_hit_tokens": "rayinfer_rank_disk_cache_hit_tokens_total",
    "disk_miss_tokens": "rayinfer_rank_disk_cache_miss_tokens_total",
    "disk_bytes_read": "rayinfer_rank_disk_cache_read_bytes_total",
    "disk_bytes_written": "rayinfer_rank_disk_cache_written_bytes_total",
    "disk_read_seconds": "rayinfer_rank_disk_cache_read_seconds_total",  # latency: divide by the pages read
    "disk_pages_read": "rayinfer_rank_disk_cache_pages_read_total",
    "disk_evictions": "rayinfer_rank_disk_cache_evictions_total",
    "disk_corrupt_pages": "rayinfer_rank_disk_cache_corrupt_pages_total",
    "disk_writes_dropped": "rayinfer_rank_disk_cache_writes_dropped_total",
}
_GAUGES = {"kv_usage": "rayinfer_rank_kv_usage", "num_running": "rayinfer_rank_running_requests",
           "num_waiting": "rayinfer_rank_waiting_requests", "kv_blocks_used": "rayinfer_rank_kv_blocks_used",
           "expert_recv_window": "rayinfer_rank_expert_recv_tokens",  # dispatch receive load, sliding window
           "gang_expert_imbalance": "rayinfer_gang_expert_imbalance"}  # max/mean receive load over the gang


class RankMetrics:
    def __init__(self, role: str, rank: int, gang: str):
        self.tags = {"role": role, "rank": str(rank), "gang": gang}
        self.counters = {k: Counter(n, f"engine counter {k}", _RANK_TAGS) for k, n in _COUNTERS.items()}
        self.gauges = {k: Gauge(n, f"engine gauge {k}", _RANK_TAGS) for k, n in _GAUGES.items()}
        self.transfers = Counter("rayinfer_rank_kv_transfers_total", "KV handoffs received, by outcome",
                                 _RANK_TAGS + ("outcome",))
        self.last: dict = {}

    def update(self, stats: dict) -> None:
        for key, counter in self.counters.items():
            delta = stats.get(key, 0) - self.last.get(key, 0)
            if delta > 0:
                counter.inc(delta, self.tags)
        for key, gauge in self.gauges.items():
            gauge.set(stats.get(key, 0), self.tags)
        for outcome, n in stats.get("kv_transfers", {}).items():
            delta = n - self.last.get("kv_transfers", {}).get(outcome, 0)
            if delta > 0:
                self.transfers.inc(delta, dict(self.tags, outcome=outcome))
        self.last = stats


class IngressMetrics:
    def __init__(self, model: str):
        self.tags = {"model": model}
        self.requests = Counter("rayinfer_requests_total", "HTTP requests by endpoint and status",
                                ("model", "endpoint", "status"))
        self.prompt_tokens = Counter("rayinfer_prompt_tokens_total", "prompt tokens", ("model",))
        self.generation_tokens = Counter("rayinfer_generation_tokens_total", "generated tokens", ("model",))
        self.cached_tokens = Counter("rayinfer_cached_prompt_tokens_total", "prompt tokens served from the prefix cache",
                                     ("model",))
        self.ttft = Histogram("rayinfer_time_to_first_token_seconds", "time to first token",
                              [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], ("model",))
        self.itl = Histogram("rayinfer_inter_token_latency_seconds", "time between streamed tokens",
                             [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5], ("model",))
        self.queue = Gauge("rayinfer_ingress_queue_depth", "requests in flight at this ingress replica", ("model",))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.inc(1, dict(self.tags, endpoint=endpoint, status=str(status)))


def _node_endpoints() -> list[str]:
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


async def scrape_cluster(client) -> str:
    """The `rayinfer_*` series of every alive node's Ray metrics agent, as Prometheus text."""
    endpoints = await asyncio.to_thread(_node_endpoints)  # ray.nodes() blocks: keep it off the event loop
    texts = await asyncio.gather(*(client.get(u, timeout=5.0) for u in endpoints), return_exceptions=True)
    keep, seen = [], set()
    for r in texts:
        if isinstance(r, Exception) or r.status_code != 200:
            continue
        for line in r.text.splitlines():
            body = line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line
            if body.startswith(("ray_rayinfer_", "rayinfer_")) and line not in seen:
                seen.add(line)
                keep.append(line)
    return "\n".join(keep) + "\n"
