"""Load-balancer benchmark: rayinfer's prefill/decode policies against round-robin and
power-of-two-choices, on a simulated fleet whose stats reach the router late.

A seeded workload (uniform, lognormal or Pareto prompt and output lengths; Poisson or bursty
arrivals) is routed over N ranks. Each rank reports its load once per period (own phase); the
router gets the report `delay` s later. Service models:
  prefill  a gang stepping together (DESIGN 3: every MoE layer is a collective): each step every
           rank prefills up to CHUNK tokens from its FIFO queue, and the step lasts as long as
           the slowest rank (linear cost per token + cost per unit of attention work). Not
           independent FIFO queues: there a rank behind a long prompt falls behind the others,
           and max/mean then rewards piling more work behind it (a larger mean).
  decode   each request holds prompt + 20 tokens/s of output of KV until its output is done.
Metrics, sampled every 50 ms after a warm-up, as max/mean over ranks:
  attn, tokens  prefill: queued attention work and input tokens, counted only while at least a
                chunk per rank is queued (with less, no router could fill every rank's step)
  step          prefill: the current step's compute, slowest rank over the mean
  ttft          prefill: time to first token per request, s (not a ratio)
  kv, reqs      decode: KV in use and running requests per rank
  over          decode: share of samples in which some rank exceeds its KV capacity
Policies, fed the same reports: ours (LoadTracker.pick: reports + own routes since, scored by
pick_{prefill,decode}_rank), round-robin, power-of-two (on the tracker's loads, the same
information as ours), and two ablations: ours-stale (pick_* on the last reports alone) and
ours+done (ours, also told when requests finish, as an ingress could).

    python benchmarks/balancers.py                 # 8 ranks, 2000 requests, 3 workloads
    python benchmarks/balancers.py --ranks 32 --requests 8000 --seed 1
"""

import argparse
import heapq
import math
import random
from dataclasses import dataclass

from rayinfer.balance.policies import (RankLoad, RequestCost, pick_decode_rank,
                                       pick_prefill_rank, power_of_two, round_robin)
from rayinfer.balance.tracker import LoadTracker

POLICIES = ("ours", "round-robin", "power-of-two", "ours-stale", "ours+done")
TOKEN_RATE = 10_000.0      # prefill tokens/s per rank (linear layers + dispatch)
ATTN_RATE = 4e7            # attention work/s per rank: an 8k prompt's attention ~ its linear part
CHUNK = 8192               # prefill tokens per rank per step (chunked prefill)
DECODE_TPS = 20.0          # output tokens/s per request (the published per-user rate)
DECODE_SEQS = 32           # running requests per decode rank the arrival rate aims at
WARMUP = {"prefill": 0.05, "decode": 0.25}  # share of the arrival window not sampled


@dataclass(frozen=True)
class Workload:
    name: str
    lengths: str           # uniform | lognormal | pareto
    burst: float           # mean requests per burst; 1 = Poisson arrivals
    prefill_load: float    # compute utilisation if the gang were perfectly balanced
    decode_load: float     # KV utilisation


# Prefill loads keep each workload backlogged part of the time without running away: a gang
# is slower than its ranks' sum (the slowest rank sets each step), the more so with long prompts.
WORKLOADS = (Workload("uniform", "uniform", 1.0, 0.9, 0.8),
             Workload("lognormal", "lognormal", 4.0, 0.6, 0.8),
             Workload("pareto-bursty", "pareto", 16.0, 0.5, 0.8))


@dataclass(frozen=True)
class Request:
    at: float
    cost: RequestCost
    out: int               # actual output tokens (the router sees only cost.max_tokens)


@dataclass(frozen=True)
class Trace:
    stage: str
    requests: list[Request]
    kv_capacity: int       # decode KV tokens per rank that puts the fleet at the workload's load


def _lengths(rng: random.Random, kind: str) -> tuple[int, int]:
    if kind == "uniform":
        prompt, out = rng.uniform(256, 4096), rng.uniform(64, 1024)
    elif kind == "lognormal":
        prompt = rng.lognormvariate(math.log(1500), 1.0)
        out = rng.lognormvariate(math.log(300), 1.0)
    elif kind == "pareto":
        prompt, out = 400 * rng.paretovariate(1.3), 100 * rng.paretovariate(1.5)
    else:
        raise ValueError(f"unknown length distribution {kind!r}")
    return min(32768, max(16, int(prompt))), min(8192, max(1, int(out)))


def make_trace(wl: Workload, stage: str, n: int, ranks: int, seed: int) -> Trace:
    """Seeded requests, arriving at the rate that loads the fleet as `wl` asks."""
    if stage not in ("prefill", "decode"):
        raise ValueError(f"stage must be 'prefill' or 'decode', got {stage!r}")
    rng = random.Random(seed)
    costs, outs = [], []
    for _ in range(n):
        prompt, out = _lengths(rng, wl.lengths)
        # Half the prompts hit the prefix cache (DeepSeek reports 56% of input tokens do); the
        # output budget is 1-4x the actual output, which only the simulator knows.
        cached = int(prompt * rng.uniform(0.2, 0.9)) if rng.random() < 0.5 else 0
        costs.append(RequestCost(prompt, cached, min(16384, math.ceil(out * rng.uniform(1, 4)))))
        outs.append(out)
    capacity = 0
    if stage == "prefill":
        busy = sum(c.uncached / TOKEN_RATE + c.attention_work / ATTN_RATE for c in costs)
        duration = busy / (ranks * wl.prefill_load)
    else:
        duration = sum(outs) / DECODE_TPS / (ranks * DECODE_SEQS)
        kv_s = sum((c.prompt_tokens + o / 2) * o / DECODE_TPS for c, o in zip(costs, outs))
        capacity = max(int(kv_s / duration / ranks / wl.decode_load),
                       max(c.kv_tokens for c in costs))
    times, t = [], 0.0
    while len(times) < n:
        t += rng.expovariate(n / (wl.burst * duration))
        size = 1 if wl.burst <= 1 else 1 + int(rng.expovariate(1 / (wl.burst - 1)))
        times += [t + rng.uniform(0, 0.05) for _ in range(size)]
    reqs = [Request(at, c, o) for at, c, o in zip(sorted(times[:n]), costs, outs)]
    return Trace(stage, reqs, capacity)


def _attn_left(u: int, p: int, c: int) -> float:
    # Positions p+1..u of a prompt with c cached tokens, each attending to c + its position.
    return (u - p) * c + (u * (u + 1) - p * (p + 1)) / 2


class _PrefillGang:
    """Ranks step together (every MoE layer is a collective): each step every rank prefills up
    to CHUNK tokens from its FIFO queue, and the step lasts as long as the slowest rank."""

    def __init__(self, ranks: int):
        self.queues = [[] for _ in range(ranks)]   # entries [uncached, done, cached, req, at]
        self.step_end, self.step_ratio, self.in_step = None, 0.0, []

    def add(self, k: int, req: Request, now: float) -> None:
        self.queues[k].append([req.cost.uncached, 0, req.cost.cached_tokens, req, now])

    def start(self, now: float) -> float | None:
        """Start a step if any rank has work; the chunks leave the queues now."""
        costs, self.in_step = [], []
        for k, q in enumerate(self.queues):
            budget, tok, attn = CHUNK, 0, 0.0
            while q and budget:
                e = q[0]
                n = min(budget, e[0] - e[1])
                attn += _attn_left(e[1] + n, e[1], e[2])
                e[1] += n
                budget, tok = budget - n, tok + n
                if e[1] == e[0]:
                    self.in_step.append((k, q.pop(0)))
            costs.append(tok / TOKEN_RATE + attn / ATTN_RATE)
        busy = max(costs) > 0 or bool(self.in_step)
        self.step_ratio = max(costs) * len(costs) / sum(costs) if sum(costs) else 1.0
        self.step_end = now + max(costs) if busy else None
        return self.step_end

    def queued(self, k: int) -> tuple[float, int]:
        q = self.queues[k]
        return sum(_attn_left(e[0], e[1], e[2]) for e in q), sum(e[0] - e[1] for e in q)

    def load(self, k: int, now: float) -> RankLoad:
        (attn, tok), n = self.queued(k), len(self.queues[k])
        return RankLoad(num_requests=n, prefill_tokens=tok, attention_work=attn)


class _DecodeFleet:
    """Each rank's running requests hold prompt + DECODE_TPS * (now - start) tokens of KV."""

    def __init__(self, ranks: int, capacity: int):
        self.count, self.prompts, self.starts = [0] * ranks, [0] * ranks, [0.0] * ranks
        self.capacity, self.max_seqs = capacity, 2 * DECODE_SEQS

    def add(self, k: int, req: Request, now: float, sign: int = 1) -> None:
        self.count[k] += sign
        self.prompts[k] += sign * req.cost.prompt_tokens
        self.starts[k] += sign * now

    def kv(self, k: int, now: float) -> float:
        return self.prompts[k] + DECODE_TPS * (self.count[k] * now - self.starts[k])

    def load(self, k: int, now: float) -> RankLoad:
        return RankLoad(num_requests=self.count[k], kv_used_tokens=round(self.kv(k, now)),
                        kv_capacity_tokens=self.capacity, max_num_seqs=self.max_seqs)


def simulate(trace: Trace, policy: str, ranks: int, *, period=1.0, delay=0.2, grace=0.1,
             sample_dt=0.05, seed=0) -> dict[str, list[float]]:
    """Route the trace over `ranks`; returns each metric's samples (see module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    stage, requests, rng = trace.stage, trace.requests, random.Random(seed)
    ids = [f"r{i}" for i in range(ranks)]
    fleet = _PrefillGang(ranks) if stage == "prefill" else _DecodeFleet(ranks, trace.kv_capacity)
    tracker, reported = LoadTracker(stage, grace), [RankLoad() for _ in ids]
    pick = pick_prefill_rank if stage == "prefill" else pick_decode_rank
    # (time, kind, seq, rank or request index, data); seq keeps ties off `data`. Kinds: 0 a
    # decode request leaves, 1 a rank takes stats, 2 a request arrives, 3 stats reach the
    # router, 4 sample, 5 a prefill step ends.
    events = [(r.at, 2, i, i, None) for i, r in enumerate(requests)]
    events += [(rng.uniform(0, period), 1, 0, k, None) for k in range(ranks)]
    start, end = requests[0].at, requests[-1].at
    first = start + WARMUP[stage] * (end - start)
    events += [(first + j * sample_dt, 4, j, 0, None)
               for j in range(int((end - first) / sample_dt))]
    heapq.heapify(events)
    seq = len(events)
    out = {m: [] for m in (("step", "attn", "tokens", "ttft") if stage == "prefill" else
                           ("kv", "reqs", "over"))}
    while events:
        now, kind, _, i, data = heapq.heappop(events)
        seq += 1
        if kind == 0:
            fleet.add(i, data, data.at, sign=-1)
            if policy == "ours+done":
                tracker.finished(ids[i], data.cost, now)
        elif kind == 1:
            heapq.heappush(events, (now + delay, 3, seq, i, (fleet.load(i, now), now)))
            if now < end:  # nothing is routed after the last arrival
                heapq.heappush(events, (now + period, 1, seq, i, None))
        elif kind == 3:
            tracker.report(ids[i], data[0], data[1])
            reported[i] = data[0]
        elif kind == 2:
            req = requests[i]
            if policy in ("ours", "ours+done"):
                k = ids.index(tracker.pick(ids, req.cost, now))
            elif policy == "ours-stale":
                k = pick(reported, req.cost)
            elif policy == "round-robin":
                k = round_robin(reported, req.cost, i)
            else:
                k = power_of_two(tracker.loads(ids, now), req.cost, rng)
            tracker.routed(ids[k], req.cost, now)
            fleet.add(k, req, now)
            if stage == "decode":
                heapq.heappush(events, (now + req.out / DECODE_TPS, 0, seq, k, req))
            elif fleet.step_end is None and (t := fleet.start(now)) is not None:
                heapq.heappush(events, (t, 5, seq, 0, None))
        elif kind == 5:
            for k, e in fleet.in_step:
                out["ttft"].append(now - e[4])
                if policy == "ours+done":
                    tracker.finished(ids[k], e[3].cost, now)
            if (t := fleet.start(now)) is not None:
                heapq.heappush(events, (t, 5, seq, 0, None))
        elif stage == "prefill":   # kind 4: sample
            if fleet.step_end is not None:
                out["step"].append(fleet.step_ratio)
            queued = [fleet.queued(k) for k in range(ranks)]
            # With less than a chunk per rank queued, the next steps cannot be balanced
            # whatever the router did: only backlogged moments measure it.
            if sum(q[1] for q in queued) >= ranks * CHUNK:
                _ratio(out["attn"], [q[0] for q in queued])
                _ratio(out["tokens"], [q[1] for q in queued])
        else:
            kvs = [fleet.kv(k, now) for k in range(ranks)]
            _ratio(out["kv"], kvs)
            _ratio(out["reqs"], fleet.count)
            out["over"].append(float(max(kvs) > fleet.capacity))
    return out


def _ratio(samples: list[float], values: list[float]) -> None:
    mean = sum(values) / len(values)
    if mean > 0:  # an idle fleet is neither balanced nor not
        samples.append(max(values) / mean)


def summary(samples: list[float]) -> tuple[float, float]:
    """(mean, p99) of samples; (nan, nan) when there are none."""
    if not samples:
        return math.nan, math.nan
    ordered = sorted(samples)
    return sum(ordered) / len(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--period", type=float, default=1.0, help="stats period, s")
    ap.add_argument("--delay", type=float, default=0.2, help="report transit delay, s")
    args = ap.parse_args()
    print(f"{args.ranks} ranks, {args.requests} requests, seed {args.seed}, stats every "
          f"{args.period} s, {args.delay} s in transit. Cells: mean / p99 over samples (ttft: "
          f"over requests, s; over: share of samples). vs: ours' mean / the baseline's.")
    head = "".join(f"{p:>16}" for p in POLICIES)
    for stage in ("prefill", "decode"):
        print(f"\n{stage:<8}{'workload':<15}{'load':>5} {'metric':<7}{head}  vs rr  vs p2c")
        for wl in WORKLOADS:
            trace = make_trace(wl, stage, args.requests, args.ranks, args.seed)
            runs = {p: simulate(trace, p, args.ranks, period=args.period, delay=args.delay,
                                seed=args.seed) for p in POLICIES}
            load = wl.prefill_load if stage == "prefill" else wl.decode_load
            for metric in runs["ours"]:
                stats = {p: summary(runs[p][metric]) for p in POLICIES}
                cells = "".join(f"{m:>9.3f} /{q:>5.2f}" if metric != "over" else f"{m:>16.3f}"
                                for m, q in stats.values())
                ours = stats["ours"][0]
                ratios = "".join(f"{ours / stats[b][0] if stats[b][0] else math.nan:>7.3f}"
                                 for b in ("round-robin", "power-of-two"))
                print(f"{'':<8}{wl.name:<15}{load:>5.2f} {metric:<7}{cells}{ratios}")


if __name__ == "__main__":
    main()
