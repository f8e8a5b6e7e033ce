"""DeepSeek's daily report, computed from rayinfer's Prometheus metrics: tokens, throughput per node,
output speed per request, KV read per output token, gangs, GPU hours, cost, revenue and margin.

Plain Python, no Ray: what crosses in is Prometheus text (one scrape of the ingress's `/metrics`) or the
ingress's sampled history (`/metrics/history`, JSON: `{"samples": [{"t": unix_s, "values": {series: v}}]}`);
what goes out is one dict (`--json`), a table and, optionally, the series for a plot. Totals are the
differences of counters between the window's first and last samples, so a window's figures are exact
however coarse the sampling; only `gangs_peak` and the plot depend on the sample spacing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

Sample = tuple[float, dict[str, float]]  # (unix seconds, {'name{labels}': value})
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Prices:
    """USD: per GPU-hour, per million input tokens served from cache / computed, per million output tokens."""
    gpu_hour: float = 2.0
    cache_hit: float = 0.14
    cache_miss: float = 0.55
    output: float = 2.19
    gpus_per_node: int = 8

    def __post_init__(self):
        for k in ("gpu_hour", "cache_hit", "cache_miss", "output"):
            if getattr(self, k) < 0:
                raise ValueError(f"price {k} must be >= 0, got {getattr(self, k)}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}; comments and `_created` series dropped."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, rest = line.partition("}") if "{" in line else line.partition(" ")
        key = head + "}" if "{" in line else head
        if key.split("{")[0].endswith("_created"):
            continue
        out[key] = float(rest.split()[0])
    return out


def total(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series called `name` whose labels include `labels`."""
    s = 0.0
    for key, v in values.items():
        head, _, body = key.partition("{")
        if head == name and all(dict(_LABEL.findall(body)).get(k) == want for k, want in labels.items()):
            s += v
    return s


def label_values(values: dict[str, float], name: str, label: str) -> list[str]:
    return sorted({dict(_LABEL.findall(k.partition("{")[2])).get(label) for k in values
                   if k.partition("{")[0] == name} - {None})


def load_dump(text: str) -> list[Sample]:
    """A saved `/metrics/history` (JSON) or `/metrics` scrape (text) -> samples.

    One scrape covers the server's lifetime: counters start at zero at `rayinfer_server_start_time_seconds`
    and the scrape was taken `rayinfer_uptime_seconds` later."""
    if text.lstrip().startswith("{"):
        return [(float(s["t"]), {k: float(v) for k, v in s["values"].items()}) for s in json.loads(text)["samples"]]
    values = parse_prometheus(text)
    if not label_values(values, "rayinfer_server_start_time_seconds", "model"):
        raise ValueError("the metrics dump has no rayinfer_server_start_time_seconds: is it a rayinfer /metrics scrape?")
    start = total(values, "rayinfer_server_start_time_seconds")
    zero = {k: (v if k.startswith(("rayinfer_gangs{", "rayinfer_server_start")) else 0.0) for k, v in values.items()}
    return [(start, zero), (start + total(values, "rayinfer_uptime_seconds"), values)]


def window(samples: list[Sample], since_s: float | None) -> list[Sample]:
    """The samples of the last `since_s` seconds (all of them when None), oldest first."""
    if not samples:
        raise ValueError("no metrics samples to report on")
    samples = sorted(samples, key=lambda s: s[0])
    if since_s is None:
        return samples
    if since_s <= 0:
        raise ValueError(f"--since must be > 0 seconds, got {since_s}")
    start = samples[-1][0] - since_s
    first = max([i for i, (t, _) in enumerate(samples) if t <= start] or [0])
    return samples[first:]


def _roles(values: dict[str, float]) -> list[str]:
    return label_values(values, "rayinfer_rank_seconds_total", "role") or label_values(values, "rayinfer_gangs", "role")


def compute(samples: list[Sample], prices: Prices = Prices(), since_s: float | None = None) -> dict:
    """The report over the window: every key `rayinfer report --json` prints."""
    win = window(samples, since_s)
    (t0, a), (t1, b) = win[0], win[-1]

    def delta(name: str, **labels) -> float:
        return total(b, name, **labels) - total(a, name, **labels)

    span = t1 - t0
    inp, hit, out = (delta(f"rayinfer_{n}_tokens_total") for n in ("prompt", "cached_prompt", "generation"))
    roles = _roles(b)
    rank_s = {r: delta("rayinfer_rank_seconds_total", role=r) for r in roles}
    gang_s = {r: delta("rayinfer_gang_seconds_total", role=r) for r in roles}
    prefill_node_s = (rank_s.get("prefill", 0) + rank_s.get("mixed", 0)) / prices.gpus_per_node
    decode_node_s = (rank_s.get("decode", 0) + rank_s.get("mixed", 0)) / prices.gpus_per_node
    tpot_n, tpot_s = delta("rayinfer_time_per_output_token_seconds_count"), delta("rayinfer_time_per_output_token_seconds_sum")
    gpu_hours = sum(rank_s.values()) / 3600
    cost = gpu_hours * prices.gpu_hour
    revenue = (hit * prices.cache_hit + (inp - hit) * prices.cache_miss + out * prices.output) / 1e6
    by_role = {r: {"gangs_peak": max(total(v, "rayinfer_gangs", role=r) for _, v in win),
                   "gangs_avg": gang_s[r] / span if span else total(b, "rayinfer_gangs", role=r),
                   "gpu_hours": rank_s[r] / 3600} for r in roles}
    return {
        "window_s": span, "start_time": t0, "end_time": t1,
        "requests": delta("rayinfer_requests_total", status="200"),
        "input_tokens": inp, "cache_hit_tokens": hit, "cache_miss_tokens": inp - hit, "output_tokens": out,
        "cache_hit_rate": hit / inp if inp else 0.0,
        "prefill_tokens_per_s_per_node": inp / prefill_node_s if prefill_node_s else 0.0,
        "decode_tokens_per_s_per_node": out / decode_node_s if decode_node_s else 0.0,
        "output_tokens_per_s_per_request": tpot_n / tpot_s if tpot_s else 0.0,
        "kv_tokens_per_output_token": delta("rayinfer_kv_tokens_read_total") / out if out else 0.0,
        "gangs_peak": max(sum(total(v, "rayinfer_gangs", role=r) for r in roles) for _, v in win),
        "gangs_avg": sum(gang_s.values()) / span if span else sum(total(b, "rayinfer_gangs", role=r) for r in roles),
        "nodes_avg": sum(rank_s.values()) / prices.gpus_per_node / span if span else 0.0,
        "gpu_hours": gpu_hours, "cost_usd": cost, "revenue_usd": revenue,
        "cost_profit_margin": (revenue - cost) / cost if cost else None,
        "by_role": by_role,
    }


def series(samples: list[Sample], since_s: float | None = None) -> dict:
    """At each sample (seconds into the window): the rates over the interval it opens (the last repeats the one
    before, for a step plot), requests/s and input and output tokens/s; and the gangs per role it saw."""
    win = window(samples, since_s)
    roles = _roles(win[-1][1])
    rates = (("requests_per_s", "rayinfer_requests_total", {"status": "200"}),
             ("input_tokens_per_s", "rayinfer_prompt_tokens_total", {}),
             ("output_tokens_per_s", "rayinfer_generation_tokens_total", {}))
    out = {"t": [t - win[0][0] for t, _ in win], "gangs": {r: [total(v, "rayinfer_gangs", role=r) for _, v in win]
                                                           for r in roles}}
    for key, name, labels in rates:
        out[key] = [(total(b, name, **labels) - total(a, name, **labels)) / (tb - ta) if tb > ta else 0.0
                    for (ta, a), (tb, b) in zip(win, win[1:])]
        out[key].append(out[key][-1] if out[key] else 0.0)
    return out


def _si(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:,.2f}{unit}"
    return f"{x:,.2f}"


def table(r: dict) -> str:
    """The report as DeepSeek laid out its day."""
    margin = "n/a (no GPU time)" if r["cost_profit_margin"] is None else f"{r['cost_profit_margin']:.0%}"
    rows = [
        ("window", f"{r['window_s']:,.0f} s ({r['window_s'] / 3600:.2f} h)"),
        ("requests", f"{r['requests']:,.0f}"),
        ("input tokens", f"{_si(r['input_tokens'])} ({_si(r['cache_hit_tokens'])} cache hits, "
                         f"{r['cache_hit_rate']:.1%})"),
        ("output tokens", _si(r["output_tokens"])),
        ("prefill throughput", f"{_si(r['prefill_tokens_per_s_per_node'])} input tokens/s per node"),
        ("decode throughput", f"{_si(r['decode_tokens_per_s_per_node'])} output tokens/s per node"),
        ("output speed", f"{r['output_tokens_per_s_per_request']:,.1f} tokens/s per request"),
        ("KV length", f"{r['kv_tokens_per_output_token']:,.0f} tokens per output token"),
        ("gangs", f"peak {r['gangs_peak']:.0f}, average {r['gangs_avg']:.2f} ("
                  + ", ".join(f"{k} {v['gangs_avg']:.2f}" for k, v in r["by_role"].items()) + ")"),
        ("nodes", f"average {r['nodes_avg']:.2f}"),
        ("GPU hours", f"{r['gpu_hours']:,.3f}"),
        ("cost", f"${r['cost_usd']:,.2f}"),
        ("revenue", f"${r['revenue_usd']:,.2f}"),
        ("cost-profit margin", margin),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '6h', '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"--since must be seconds or a number with s/m/h/d, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"--since must be > 0, got {text!r}")
    return value


def plot(s: dict, path: str, title: str = "rayinfer") -> None:
    """Requests/s, tokens/s and gangs per role over the window, one panel each, into `path` (PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'rayinfer[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = max(s["t"] or [0]) > 3 * 3600
    t = [x / (3600 if hours else 1) for x in s["t"]]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].step(t, s["requests_per_s"], where="post", label="requests/s")
    axes[1].step(t, s["input_tokens_per_s"], where="post", label="input tokens/s")
    axes[1].step(t, s["output_tokens_per_s"], where="post", label="output tokens/s")
    for i, (role, gangs) in enumerate(s["gangs"].items()):  # dashes keep equal counts apart
        axes[2].step(t, gangs, where="post", label=f"{role} gangs", linestyle=("-", "--", ":")[i % 3], linewidth=2)
    for ax, ylabel in zip(axes, ("requests/s", "tokens/s", "gangs")):
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("hours into the window" if hours else "seconds into the window")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
