"""rayinfer's own Prometheus metrics (`rayinfer_*`), owned and served by the ingress at `/metrics`.

They live in a private `prometheus_client` registry (a dependency of `ray[serve]`), so series carry only
labels that mean something (model, endpoint, status, role, gang, rank) and none of Ray's process labels;
Ray's own metrics stay on Ray's metrics agents. What crosses in:
  - request-level counts from the ingress's request path, where each request's usage is known, so totals
    equal what clients were billed (requests, input / cache-hit / output tokens, KV tokens read, TTFT, TPOT);
  - every rank's `stats()` dict, polled by a Serve broadcast each `period_s` (and at every scrape): engine
    counters and load per rank, gangs per role, and the rank-seconds and gang-seconds they add up to.
What crosses out: Prometheus text, and a bounded time series of the series `rayinfer report` reads
(`history`, served at `/metrics/history`), which halves its resolution when full so it spans the lifetime.
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rayinfer.report import parse_prometheus

ROLES = ("prefill", "decode", "mixed")
_RANK_COUNTERS = {  # engine counter -> (metric name without _total, help)
    "prefill_tokens_computed": ("rayinfer_rank_prefill_tokens", "prompt tokens computed (prefill) on this rank"),
    "decode_tokens_computed": ("rayinfer_rank_decode_tokens", "tokens computed in decode steps on this rank"),
    "generation_tokens": ("rayinfer_rank_generation_tokens", "tokens sampled on this rank"),
    "kv_imported_tokens": ("rayinfer_rank_kv_imported_tokens", "KV tokens received from prefill ranks"),
    "kv_exported_tokens": ("rayinfer_rank_kv_exported_tokens", "KV tokens handed to decode ranks"),
    "num_preemptions": ("rayinfer_rank_preemptions", "requests preempted for lack of KV pages"),
    "eplb_rebalances": ("rayinfer_rank_eplb_rebalances", "expert re-placements done by this rank's gang"),
    "disk_hit_tokens": ("rayinfer_rank_disk_cache_hit_tokens", "prompt tokens loaded from the disk KV tier"),
    "disk_miss_tokens": ("rayinfer_rank_disk_cache_miss_tokens", "prompt tokens looked up on disk and not found"),
    "disk_bytes_read": ("rayinfer_rank_disk_cache_read_bytes", "bytes read from the disk KV tier"),
    "disk_bytes_written": ("rayinfer_rank_disk_cache_written_bytes", "bytes written to the disk KV tier"),
    "disk_read_seconds": ("rayinfer_rank_disk_cache_read_seconds", "seconds spent reading pages (divide by pages read)"),
    "disk_pages_read": ("rayinfer_rank_disk_cache_pages_read", "pages read from the disk KV tier"),
    "disk_evictions": ("rayinfer_rank_disk_cache_evictions", "pages evicted for the disk tier's byte budget"),
    "disk_corrupt_pages": ("rayinfer_rank_disk_cache_corrupt_pages", "disk pages ignored: corrupt, truncated or foreign"),
    "disk_writes_dropped": ("rayinfer_rank_disk_cache_writes_dropped", "page writes dropped: queue full or disk full"),
}
_RANK_GAUGES = {
    "kv_usage": ("rayinfer_rank_kv_usage", "fraction of this rank's KV pages in use"),
    "kv_blocks_used": ("rayinfer_rank_kv_blocks_used", "KV pages in use"),
    "num_running": ("rayinfer_rank_running_requests", "requests being computed"),
    "num_waiting": ("rayinfer_rank_waiting_requests", "requests queued on this rank"),
    "expert_recv_window": ("rayinfer_rank_expert_recv_tokens", "dispatch receive load over a sliding window"),
    "gang_expert_imbalance": ("rayinfer_gang_expert_imbalance", "max/mean expert receive load over the gang"),
}
_REPORT_SERIES = ("rayinfer_requests_total", "rayinfer_prompt_tokens_total", "rayinfer_cached_prompt_tokens_total",
                  "rayinfer_generation_tokens_total", "rayinfer_kv_tokens_read_total", "rayinfer_gangs",
                  "rayinfer_rank_seconds_total", "rayinfer_gang_seconds_total",
                  "rayinfer_time_per_output_token_seconds_sum", "rayinfer_time_per_output_token_seconds_count")


class _Tagged:
    """A prometheus_client metric called the way Ray's metrics are: `inc(n, tags)`, `observe(v, tags)`."""

    def __init__(self, metric):
        self.metric = metric

    def inc(self, n: float, tags: dict) -> None:
        self.metric.labels(**tags).inc(n)

    def observe(self, v: float, tags: dict) -> None:
        self.metric.labels(**tags).observe(v)

    def set(self, v: float, tags: dict) -> None:
        self.metric.labels(**tags).set(v)


class _RankCollector:
    """Exports the last polled `stats()` of every rank, one series per (role, gang, rank)."""

    def __init__(self, owner: IngressMetrics):
        self.owner = owner

    def collect(self):
        labels = ["model", "role", "gang", "rank"]
        ranks = self.owner.ranks
        for specs, family in ((_RANK_COUNTERS, CounterMetricFamily), (_RANK_GAUGES, GaugeMetricFamily)):
            for key, (name, help_) in specs.items():
                m = family(name, help_, labels=labels)
                for s in ranks:
                    if key in s:
                        m.add_metric([self.owner.model, s["role"], str(s["gang_id"]), str(s["rank"])], float(s[key]))
                yield m
        m = CounterMetricFamily("rayinfer_rank_kv_transfers", "KV handoffs received, by outcome",
                                labels=labels + ["outcome"])
        for s in ranks:
            for outcome, n in s.get("kv_transfers", {}).items():
                m.add_metric([self.owner.model, s["role"], str(s["gang_id"]), str(s["rank"]), outcome], float(n))
        yield m


class IngressMetrics:
    def __init__(self, model: str, handles: dict | None = None, period_s: float = 5.0, max_samples: int = 2048):
        self.model, self.tags = model, {"model": model}
        self.handles = {r: h for r, h in (handles or {}).items() if h is not None}
        self.registry = r = CollectorRegistry()
        m = ("model",)
        self.requests = _Tagged(Counter("rayinfer_requests", "HTTP requests by endpoint and status",
                                        m + ("endpoint", "status"), registry=r))
        self.prompt_tokens = _Tagged(Counter("rayinfer_prompt_tokens", "input tokens billed (usage.prompt_tokens)",
                                             m, registry=r))
        self.cached_tokens = _Tagged(Counter("rayinfer_cached_prompt_tokens", "input tokens served from the "
                                             "prefix cache (usage.prompt_cache_hit_tokens)", m, registry=r))
        self.generation_tokens = _Tagged(Counter("rayinfer_generation_tokens", "output tokens sent "
                                                 "(usage.completion_tokens)", m, registry=r))
        self.kv_tokens_read = _Tagged(Counter("rayinfer_kv_tokens_read", "sum over output tokens of the context "
                                              "length (KV tokens) each was computed from", m, registry=r))
        self.ttft = _Tagged(Histogram("rayinfer_time_to_first_token_seconds", "time to first token", m, registry=r,
                                      buckets=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]))
        self.itl = _Tagged(Histogram("rayinfer_inter_token_latency_seconds", "time between streamed tokens", m,
                                     registry=r, buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]))
        self.tpot = _Tagged(Histogram("rayinfer_time_per_output_token_seconds", "per request: (last token - first "
                                      "token) / (output tokens - 1)", m, registry=r,
                                      buckets=[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1]))
        self.ttft_phase = _Tagged(Histogram(
            "rayinfer_first_token_phase_seconds", "the stages of a choice up to its first decoded token: prefill "
            "(the prefill call: routing, the rank's queue, the prompt, the first sample; what TTFT waits for), "
            "kv_handoff (the decode rank pulling the KV), first_decode (from then to the first decoded token), "
            "first_step (colocated: the call to its first token)", m + ("phase",), registry=r,
            buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]))
        self.queue = _Tagged(Gauge("rayinfer_ingress_queue_depth", "requests in flight at this ingress replica", m,
                                   registry=r))
        self.start_time = time.time()
        Gauge("rayinfer_server_start_time_seconds", "when this ingress started (unix seconds)", m,
              registry=r).labels(model=model).set(self.start_time)
        Gauge("rayinfer_uptime_seconds", "seconds since rayinfer_server_start_time_seconds", m,
              registry=r).labels(model=model).set_function(lambda: time.time() - self.start_time)
        self.gangs = Gauge("rayinfer_gangs", "gangs per role with at least one rank answering", m + ("role",),
                           registry=r)
        self.rank_seconds = Counter("rayinfer_rank_seconds", "rank (GPU) seconds served per role", m + ("role",),
                                    registry=r)
        self.gang_seconds = Counter("rayinfer_gang_seconds", "gang seconds served per role", m + ("role",),
                                    registry=r)
        for role in self.handles:
            self.gangs.labels(model=model, role=role).set(0)
            self.rank_seconds.labels(model=model, role=role)
            self.gang_seconds.labels(model=model, role=role)
        r.register(_RankCollector(self))
        self.ranks: list[dict] = []
        self.period_s, self.max_samples = period_s, max_samples
        self.samples: list[tuple[float, dict]] = []
        self._lock, self._last, self._counts, self._seen = threading.Lock(), self.start_time, {}, set()
        self._stop = threading.Event()
        self.sample(poll=False, now=self.start_time)  # all zero: the constructor may run on the event loop, where no call may block
        if self.handles:
            threading.Thread(target=self._run, name="rayinfer-metrics", daemon=True).start()

    def request(self, endpoint: str, status: int) -> None:
        self.requests.inc(1, dict(self.tags, endpoint=endpoint, status=str(status)))

    def finished(self, prompt_tokens: int, output_times: list[float]) -> None:
        """One choice ended having sent tokens at `output_times`: its TPOT and the KV its tokens read."""
        n = len(output_times)
        if n > 1:
            self.tpot.observe((output_times[-1] - output_times[0]) / (n - 1), self.tags)
        if n:  # output token k (1-based) was computed from the prompt and the k-1 tokens before it
            self.kv_tokens_read.inc(n * prompt_tokens + n * (n - 1) // 2, self.tags)

    # -- ranks, sampled off the event loop: a blocking broadcast is fine on this thread -----------
    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def _poll(self) -> list[dict]:
        ranks = []
        for role, h in self.handles.items():
            try:
                got = h.broadcast("stats").results(timeout_s=10, return_exceptions=True)
            except Exception:  # noqa: BLE001 - the broadcast itself failed: assume the ranks it saw last still run
                got = [s for s in self.ranks if s["role"] == role]
            ranks += [dict(s, role=role) for s in got if isinstance(s, dict)]  # a dead rank answers an exception
        return ranks

    def sample(self, poll: bool = True, now: float | None = None) -> None:
        """Polls every rank, adds the rank- and gang-seconds since the last sample, appends to the history.
        Blocks up to seconds: call it on a thread, never on the event loop."""
        with self._lock:
            ranks = self._poll() if poll else []
            now = now or time.time()
            for role, (n_ranks, n_gangs) in self._counts.items():  # what was up at the last sample ran since
                self.rank_seconds.labels(model=self.model, role=role).inc(n_ranks * (now - self._last))
                self.gang_seconds.labels(model=self.model, role=role).inc(n_gangs * (now - self._last))
            for s in ranks:  # ranks and gangs seen for the first time count from when they started
                since = max(s.get("started_at", now), self._last)
                for key, counter in ((s["replica_id"], self.rank_seconds), ((s["role"], s["gang_id"]), self.gang_seconds)):
                    if key not in self._seen:
                        self._seen.add(key)
                        counter.labels(model=self.model, role=s["role"]).inc(now - since)
            self._counts = {r: (sum(s["role"] == r for s in ranks), len({s["gang_id"] for s in ranks if s["role"] == r}))
                            for r in self.handles}
            for role, (_, n_gangs) in self._counts.items():
                self.gangs.labels(model=self.model, role=role).set(n_gangs)
            self.ranks, self._last = ranks, now
            values = parse_prometheus(generate_latest(self.registry).decode())
            self.samples.append((now, {k: v for k, v in values.items() if k.partition("{")[0] in _REPORT_SERIES}))
            if len(self.samples) > self.max_samples:  # keep the whole lifetime at half the resolution
                self.samples = self.samples[:1] + self.samples[2::2]

    def exposition(self) -> bytes:
        self.sample()
        return generate_latest(self.registry)

    def history(self, since_s: float | None = None) -> dict:
        self.sample()
        start = time.time() - since_s if since_s else 0.0
        keep = [s for s in self.samples if s[0] >= start]
        earlier = [s for s in self.samples if s[0] < start]
        keep = earlier[-1:] + keep  # the sample at or before the window's start, so its deltas are whole
        return {"start_time": self.start_time, "samples": [{"t": t, "values": v} for t, v in keep]}

    def close(self) -> None:
        self._stop.set()
