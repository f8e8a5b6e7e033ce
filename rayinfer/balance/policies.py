"""Prefill and decode load-balancing policies, as pure functions over per-rank loads.

Owns what a router believes about each rank (`RankLoad`), what one request will cost a rank
(`RequestCost`), the two published scoring rules (prefill: core-attention compute and input
tokens; decode: KV-cache usage and request count), and the round-robin / power-of-two-choices
baselines they are measured against. Nothing here knows about Ray: the Serve request routers
feed these functions and act on the index they return. `LoadTracker` (tracker.py, re-exported
here) turns periodic, stale replica reports plus the router's own routing into the loads.

Every pick is O(ranks), deterministic for the same inputs, and breaks ties by fewer requests,
then lower index.
"""

import random
from dataclasses import dataclass, replace

# What loading a prompt token's latents from the disk tier costs a prefill rank, as a fraction of
# computing it: reading ~36 KB per token per 61 layers at a few GB/s against a forward pass of all layers.
DISK_LOAD_COST = 0.1
# A rank holding a longer prefix on its device keeps the request while its queued prompt work is within
# this of the policy's pick (one prefill chunk): router load views lag, and the hit is certain.
AFFINITY_SLACK_TOKENS = 2048

__all__ = ["RankLoad", "RequestCost", "pick_prefill_rank", "prefer_prefix_holder", "pick_decode_rank", "round_robin",
           "power_of_two", "LoadTracker"]


@dataclass
class RankLoad:
    num_requests: int = 0           # running + waiting sequences
    prefill_tokens: int = 0         # uncached prompt tokens queued or being prefilled
    attention_work: float = 0.0     # sum of queued prefills' attention work
    kv_used_tokens: int = 0         # tokens of KV cache in use
    kv_capacity_tokens: int = 1     # total KV capacity in tokens
    max_num_seqs: int = 256

    def __post_init__(self):
        if self.kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {self.kv_capacity_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class RequestCost:
    prompt_tokens: int
    cached_tokens: int = 0          # expected prefix-cache hit (0 when unknown)
    max_tokens: int = 0             # requested output budget

    def __post_init__(self):
        if self.prompt_tokens < 0 or self.max_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got prompt_tokens={self.prompt_tokens}"
                             f" max_tokens={self.max_tokens}")
        if not 0 <= self.cached_tokens <= self.prompt_tokens:
            raise ValueError(f"cached_tokens must be in [0, prompt_tokens={self.prompt_tokens}],"
                             f" got {self.cached_tokens}")

    @property
    def uncached(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def attention_work(self) -> float:
        # New position i (1-based) attends to c cached + i new keys: sum = u*c + u*(u+1)/2.
        u, c = self.uncached, self.cached_tokens
        return u * (c + (u + 1) / 2)

    @property
    def kv_tokens(self) -> int:
        # The whole output budget, not a guess of the actual length: a decode rank that
        # overcommits KV has to preempt, and the tracker's over-count lasts one report at most.
        return self.prompt_tokens + self.max_tokens


def _check(loads: list[RankLoad]) -> None:
    if not loads:
        raise ValueError("no ranks to pick from (loads is empty)")


def _mean(total: float, n: int) -> float:
    # An all-idle fleet has nothing to normalise by; any positive constant keeps scores at 0.
    return total / n if total > 0 else 1.0


def pick_prefill_rank(loads: list[RankLoad], cost: RequestCost, device_hits: list[int] | None = None,
                      disk_hit: int = 0) -> int:
    """Rank minimising attention work and queued input tokens, each relative to the mean.

    A prefill step's time on a rank is roughly (core attention) + (linear layers and the
    dispatch send, ~ tokens), and all ranks of a gang step together, so the busiest rank on
    either axis sets the pace. Dividing each axis by its fleet mean makes both dimensionless and
    weighs a rank 2x over on tokens like one 2x over on attention, whatever the prompt mix.
    The sum, not the worse axis as for decode: here the axes grow together (attention is tokens
    x context), and in the benchmark the sum balanced both as well or better. KV room is
    no constraint: prefill KV is freed at handoff, and a rank short of it queues the work,
    which the attention term already counts.

    The request's own cost is added to each rank: it differs by rank when `device_hits[i]` (the
    tokens of its prefix rank i holds in its device cache) differ. A prefix of `disk_hit` tokens
    on the disk tier any rank can load, at `DISK_LOAD_COST` of computing it.
    """
    _check(loads)
    n = len(loads)
    mean_attn = _mean(sum(l.attention_work for l in loads) + cost.attention_work, n)
    mean_tok = _mean(sum(l.prefill_tokens for l in loads) + cost.uncached, n)
    best, best_key = 0, None
    for i, l in enumerate(loads):
        device = min(device_hits[i] if device_hits else 0, cost.prompt_tokens)
        mine = replace(cost, cached_tokens=max(cost.cached_tokens, device, min(disk_hit, cost.prompt_tokens)))
        tokens = mine.uncached + DISK_LOAD_COST * max(0, mine.cached_tokens - max(device, cost.cached_tokens))
        key = ((l.attention_work + mine.attention_work) / mean_attn + (l.prefill_tokens + tokens) / mean_tok,
               l.num_requests, i)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def prefer_prefix_holder(loads: list[RankLoad], best: int, device_hits: list[int], disk_hit: int = 0) -> int:
    """The rank holding the longest prefix on its device instead of the policy's pick `best`, when its
    queued prompt work is within a slack of `best`'s. The slack is `AFFINITY_SLACK_TOKENS` when `best`
    would compute that prefix, and `DISK_LOAD_COST` of it when `best` can load it from the disk tier."""
    _check(loads)
    home = max(range(len(loads)), key=lambda i: (device_hits[i], -i))
    if device_hits[home] <= device_hits[best]:
        return best
    slack = AFFINITY_SLACK_TOKENS * (DISK_LOAD_COST if disk_hit >= device_hits[home] else 1.0)
    return home if loads[home].prefill_tokens <= loads[best].prefill_tokens + slack else best


def _decode_tier(load: RankLoad, cost: RequestCost) -> int:
    """0: the full budget and a sequence slot fit; 1: only the prompt fits now (it may have to
    preempt later); 2: no room. Fuller tiers are used only when every rank is in them."""
    if load.num_requests + 1 > load.max_num_seqs:
        return 2
    if load.kv_used_tokens + cost.kv_tokens <= load.kv_capacity_tokens:
        return 0
    return 1 if load.kv_used_tokens + cost.prompt_tokens <= load.kv_capacity_tokens else 2


def pick_decode_rank(loads: list[RankLoad], cost: RequestCost) -> int:
    """Among the ranks in the best capacity tier, the rank whose worse axis is lowest: KV usage
    and request count after adding this request, each as a fraction of the rank's capacity
    relative to the fleet-wide fraction.

    A decode step's core attention reads every cached token and the rest of the layer scales
    with batch size; ranks step together, so both the largest KV and the largest batch set the
    step time, and a rank that runs out of KV preempts. Fractions make ranks of different sizes
    comparable; dividing by the fleet fraction weighs relative imbalance on the two axes alike
    (KV may be 60% used while request slots are 20% used). The worse axis, not the sum: with
    heavy-tailed lengths KV and count are weakly correlated, and a sum lets a rank light on one
    axis keep taking requests while it is the heaviest on the other (in the benchmark, the sum
    left request counts worse balanced than power-of-two and KV worse than with the max).
    """
    _check(loads)
    kv_frac = (sum(l.kv_used_tokens for l in loads) + cost.kv_tokens) / sum(
        l.kv_capacity_tokens for l in loads)
    req_frac = (sum(l.num_requests for l in loads) + 1) / sum(l.max_num_seqs for l in loads)
    kv_frac = kv_frac or 1.0  # zero only when nothing is in use and the request needs no KV
    best, best_key = 0, None
    for i, l in enumerate(loads):
        kv = (l.kv_used_tokens + cost.kv_tokens) / l.kv_capacity_tokens / kv_frac
        req = (l.num_requests + 1) / l.max_num_seqs / req_frac
        key = (_decode_tier(l, cost), max(kv, req), kv + req, l.num_requests, i)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def round_robin(loads: list[RankLoad], cost: RequestCost, turn: int) -> int:
    """Baseline: the caller's running counter modulo the number of ranks; ignores loads."""
    _check(loads)
    return turn % len(loads)


def power_of_two(loads: list[RankLoad], cost: RequestCost, rng: random.Random) -> int:
    """Baseline (Ray Serve's default): two distinct random ranks, the one with fewer requests
    (the first drawn on a tie)."""
    _check(loads)
    if len(loads) == 1:
        return 0
    a, b = rng.sample(range(len(loads)), 2)
    return b if loads[b].num_requests < loads[a].num_requests else a


def __getattr__(name):
    # Lazy, because tracker.py imports this module: either can be imported first.
    if name == "LoadTracker":
        from rayinfer.balance.tracker import LoadTracker
        return LoadTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
