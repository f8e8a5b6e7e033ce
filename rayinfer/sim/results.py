"""What a simulation measured, and the report made of it: per-role counters (scaled from the sampled ranks
to the cluster), latency percentiles, KV usage, and the same metric series a live server exports.

Owns `Meter`. What crosses it: events from the cluster loop in; out, `samples()` (Prometheus-shaped
`(t, {series: value})` samples, so `rayinfer.report.compute` / `table` / `series` / `plot` make the daily
report with exactly the arithmetic `rayinfer report` uses) and `summary()` (the simulator's own figures).
Counters accumulate per window and are scaled to the hour the window stands for when it closes.
"""
from __future__ import annotations

from collections import defaultdict


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": sum(s) / len(s), "n": len(s)}


class Meter:
    def __init__(self, roles: dict):
        self.roles = roles
        self.totals: dict[str, float] = defaultdict(float)
        self.bucket: dict[str, float] = defaultdict(float)
        self.gangs = {name: r.num_gangs for name, r in roles.items()}
        self.peak_gangs = dict(self.gangs)
        self.out: list[tuple[float, dict]] = [(0.0, self._values())]
        self.ttft: dict[str, list] = defaultdict(list)
        self.tpot: dict[str, list] = defaultdict(list)
        self.kv_usage: dict[str, list] = defaultdict(list)
        self.busy_s: dict[str, float] = defaultdict(float)
        self.last_t = 0.0
        self.last_finish_s = 0.0  # simulated time the last request finished (a trace's makespan)
        self.counting = True

    # ---- events, each weighted by 1 / (the share of the cluster its request was sampled with): unbiased
    # cluster-wide totals even while autoscaling changes that share (Horvitz-Thompson) ----------------
    def _add(self, key: str, v: float, weight: float) -> None:
        if self.counting:
            self.bucket[key] += v * weight

    def step(self, role, batches, cost) -> None:
        keys = sum(b.decode_keys for b in batches)
        self._add("rayinfer_kv_tokens_read_total", keys, 1 / role.fraction)
        if self.counting:
            self.busy_s[role.name] += cost["seconds"]

    def first_token(self, role, req, cached: int, ttft: float, weight: float) -> None:
        self._add('rayinfer_requests_total{status="200"}', 1, weight)
        self._add("rayinfer_prompt_tokens_total", req.prompt_tokens, weight)
        self._add("rayinfer_cached_prompt_tokens_total", cached, weight)
        if self.counting:
            self.ttft[role.name].append(ttft)

    def tokens(self, role, n: int, weight: float) -> None:
        self._add("rayinfer_generation_tokens_total", n, weight)

    def finished(self, role, req, decode_s: float, now: float, weight: float) -> None:
        self.last_finish_s = now
        n = req.output_tokens - 1
        if n <= 0 or decode_s <= 0:
            return
        self._add("rayinfer_time_per_output_token_seconds_count", n, weight)
        self._add("rayinfer_time_per_output_token_seconds_sum", decode_s, weight)
        if self.counting:
            self.tpot[role.name].append(decode_s / n)

    def sample(self, role, now: float) -> None:
        if self.counting and role.name != "prefill":
            self.kv_usage[role.name].append(sum(r.kv_usage for r in role.ranks) / len(role.ranks))

    def advance(self, now: float) -> None:
        """Integrates ranks and gangs in service up to `now`."""
        dt = now - self.last_t
        if dt > 0 and self.counting:
            for name, r in self.roles.items():
                self.bucket[f'rayinfer_rank_seconds_total{{role="{name}"}}'] += r.num_gangs * r.ep * dt
                self.bucket[f'rayinfer_gang_seconds_total{{role="{name}"}}'] += r.num_gangs * dt
                self.peak_gangs[name] = max(self.peak_gangs[name], r.num_gangs)
        self.last_t = now

    def gangs_changed(self, role, now: float) -> None:
        self.advance(now)

    # ---- windows ----------------------------------------------------------------------------------
    def close_window(self, t_report: float, now: float, scale: float) -> None:
        """Adds this window's counters x `scale` (the hour / the counted seconds) and a sample at `t_report`."""
        self.advance(now)
        for k, v in self.bucket.items():
            self.totals[k] += v * scale
        self.bucket.clear()
        self.gangs = {name: r.num_gangs for name, r in self.roles.items()}
        self.out.append((t_report, self._values()))

    def _values(self) -> dict:
        v = dict(self.totals)
        for name, r in self.roles.items():
            v[f'rayinfer_gangs{{role="{name}"}}'] = r.num_gangs
            v.setdefault(f'rayinfer_rank_seconds_total{{role="{name}"}}', 0.0)
            v.setdefault(f'rayinfer_gang_seconds_total{{role="{name}"}}', 0.0)
        return v

    def samples(self) -> list[tuple[float, dict]]:
        return list(self.out)

    def summary(self, counted_s: float) -> dict:
        roles = {}
        for name, r in self.roles.items():
            gangs_sim = len(r.gangs)
            roles[name] = {
                "ep_size": r.ep, "gangs_end": r.num_gangs, "gangs_peak": self.peak_gangs[name],
                "simulated_ranks": len(r.ranks), "kv_capacity_tokens_per_rank": r.kv_tokens,
                "expert_imbalance_eplb": r.imbalance,
                "ttft_s": percentiles(self.ttft.get(name, [])),
                "tpot_s": percentiles(self.tpot.get(name, [])),
                "kv_usage": percentiles(self.kv_usage.get(name, [])),
                "busy_fraction": self.busy_s[name] / (counted_s * gangs_sim) if counted_s else 0.0,
            }
        return roles
