"""`simulate`: a serve config, a model config, a hardware profile and a workload -> the simulated hours'
figures and DeepSeek's daily report (computed by `rayinfer.report`, as for a live server).

Owns the options (`SimOptions`), the hour-by-hour loop and the printed table. Time sampling: with
`window_s` < 3600, each simulated hour runs `window_s` seconds of simulated time at that hour's rate
(the state carries over from the previous window) and its counters stand for the whole hour; the first
window is preceded by `warmup_s` uncounted seconds. Between windows, an autoscaled role is resized for
the next hour's rate from its measured load (a steady-state autoscaler), since the delays of the live
autoscaler mean nothing across a skipped stretch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from rayinfer import report
from rayinfer.config import ModelConfig, ServeConfig
from rayinfer.sim.cluster import Cluster
from rayinfer.sim.hardware import Hardware
from rayinfer.sim.results import Meter
from rayinfer.sim.workload import Arrivals, Synthetic


@dataclass(frozen=True)
class SimOptions:
    hours: float = 1.0
    window_s: float = 3600.0        # simulated seconds per hour; < 3600 samples each hour
    warmup_s: float = 0.0           # uncounted seconds before the first window
    sample_ranks: int = 8           # ranks simulated per gang when a role is sampled
    max_exact_ranks: int = 64       # up to this many ranks per role (and no autoscaling), all are simulated
    stats_period_s: float = 1.0     # load reports to the balancers
    autoscale_tick_s: float = 10.0
    disk_read_bytes_s: float = 5e9  # per rank reading the disk tier (assumption: a 3FS-class store)
    expert_sigma: float = 0.6       # expert popularity skew (lognormal sigma) the EPLB places against
    seed: int = 0

    def __post_init__(self):
        if self.hours <= 0 or self.window_s <= 0 or self.warmup_s < 0:
            raise ValueError("--hours and --window must be > 0, --warmup >= 0")
        if self.sample_ranks < 1:
            raise ValueError(f"sample_ranks must be >= 1, got {self.sample_ranks}")


def load_model(model: str) -> ModelConfig:
    """A checkpoint or config directory (its config.json is all that is read) or a preset name."""
    import os

    if os.path.isdir(model):
        return ModelConfig.from_file(os.path.join(model, "config.json"))
    from rayinfer.model.presets import PRESETS

    if model in PRESETS:
        return ModelConfig.from_dict(PRESETS[model])
    raise ValueError(f"--model {model!r} is neither a directory with a config.json nor a preset ({', '.join(PRESETS)})")


def _rescale(cluster: Cluster, spec: Synthetic, window: float, t_prev: float, t_next: float) -> None:
    """Sizes each autoscaled role for the next window: its gangs times the change in the arrival rate, times the
    square root of (its load over the last window / its target), damped so that a window's backlog (which the
    sampled ranks drain at their own pace whatever the cluster's size) does not swing the size each hour."""
    ratio = spec.rate_at(t_next) / spec.rate_at(t_prev)
    cluster.meter.advance(cluster.now)
    for role in cluster.roles.values():
        if role.rc.autoscaling is not None and role.num_gangs:
            n = role.num_gangs
            load = cluster.desired_gangs(role, window) / n  # load / target
            new = cluster.clamp_gangs(role, n * ratio * min(2.0, max(0.5, load)) ** 0.5)
            full = cluster.clamp_gangs(role, n * ratio * load)
            if new == n and full != n:  # damping must not stall a whole gang away from where the load wants it
                new = n + (1 if full > n else -1)
            role.num_gangs = new


def simulate(serve: ServeConfig, cfg: ModelConfig, hw: Hardware, workload, opts: SimOptions = SimOptions()) -> dict:
    """Runs the simulation; -> {"report": rayinfer report's dict, "roles": per-role figures, "sim": host cost}."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    window = min(opts.window_s, 3600.0)
    trace = isinstance(workload, list)
    if trace and window < 3600:
        raise ValueError("--window applies to synthetic workloads only; a trace is replayed whole")
    cluster = Cluster(serve, cfg, hw, workload, opts, None)
    meter = Meter(cluster.roles)
    cluster.meter = meter
    cluster.start(workload if trace else Arrivals(workload))
    hours = opts.hours
    if opts.warmup_s:
        meter.counting = False
        cluster.run_until(opts.warmup_s)
        meter.counting, meter.last_t = True, cluster.now
        if window < 3600 and not trace:  # size the roles for the first hour from the warm-up's load
            _rescale(cluster, workload, opts.warmup_s / 2, cluster.now, cluster.now)
    counted = 0.0
    h = 0
    while h < hours:
        span = min(1.0, hours - h) * 3600
        win = min(window, span)
        start = cluster.now
        cluster.run_until(start + win)
        counted += win
        meter.close_window((h + span / 3600) * 3600, cluster.now, span / win)
        h += 1
        if h < hours and win < span:
            skip = span - win
            if not trace:
                _rescale(cluster, workload, win, cluster.now - win / 2, cluster.now + skip + win / 2)
            cluster.jump(skip)
            meter.last_t = cluster.now
    prices = report.Prices(gpu_hour=hw.gpu_hour_usd, gpus_per_node=hw.gpus_per_node)
    samples = meter.samples()
    rep = report.compute(samples, prices)
    return {"report": rep, "roles": meter.summary(counted), "series": report.series(samples),
            "sim": {"host_seconds": time.perf_counter() - t0, "host_cpu_seconds": time.process_time() - cpu0, "simulated_seconds": counted,
                    "hours": hours, "window_s": window, "hardware": hw.name,
                    "disk_hit_tokens": cluster.disk.hit_tokens if cluster.disk else 0,
                    "last_finish_s": meter.last_finish_s}}


def _ms(p: dict) -> str:
    if p["n"] == 0:
        return "n/a"
    return f"p50 {p['p50'] * 1e3:,.1f} ms, p90 {p['p90'] * 1e3:,.1f}, p99 {p['p99'] * 1e3:,.1f} (n={p['n']})"


def table(result: dict) -> str:
    lines = []
    rep = result["report"]
    for name, r in result["roles"].items():
        per_node = rep["prefill_tokens_per_s_per_node"] if name == "prefill" else rep["decode_tokens_per_s_per_node"]
        what = "input" if name == "prefill" else "output"
        lines.append(f"[{name}] EP{r['ep_size']}: {per_node:,.0f} {what} tokens/s per node; gangs at end "
                     f"{r['gangs_end']}, peak {r['gangs_peak']}; busy {r['busy_fraction']:.0%}")
        lines.append(f"  TTFT {_ms(r['ttft_s'])}" if name != "decode" else f"  TPOT {_ms(r['tpot_s'])}")
        if name == "mixed":
            lines.append(f"  TPOT {_ms(r['tpot_s'])}")
        if r["kv_usage"]["n"]:
            lines.append(f"  KV usage mean {r['kv_usage']['mean']:.0%}, p99 {r['kv_usage']['p99']:.0%} of "
                         f"{r['kv_capacity_tokens_per_rank']:,} tokens per rank")
        lines.append(f"  expert-load imbalance (max/mean rank, EPLB placement) {r['expert_imbalance_eplb']:.3f}")
    s = result["sim"]
    lines.append(f"[sim] {s['hours']:g} h on {s['hardware']}, {s['simulated_seconds']:,.0f} s simulated "
                 f"(window {s['window_s']:,.0f} s per hour) in {s['host_seconds']:,.1f} s of host time "
                 f"({s['host_cpu_seconds']:,.1f} s CPU)")
    return "\n".join(lines) + "\n\n" + report.table(rep)


def with_target(serve: ServeConfig, role: str, target: float) -> ServeConfig:
    """`serve` with `role`'s autoscaling target (ongoing requests per rank) set to `target`."""
    rc = serve.role(role)
    if rc.autoscaling is None:
        raise ValueError(f"role {role!r} has no autoscaling section to size")
    return replace(serve, **{role: replace(rc, autoscaling=replace(rc.autoscaling, target_ongoing_requests=target))})
