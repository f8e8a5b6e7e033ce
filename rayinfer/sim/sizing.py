"""Operating points from the cost model: how many requests a decode rank can hold at a per-user speed.

Owns `decode_concurrency`: the largest batch per decode rank whose step keeps every request at
`min_tokens_per_s`, capped by the KV cache (a batch of requests at `mean_context` tokens each). That is
the autoscaling target (ongoing requests per rank) that sizes a decode role for a speed SLO; the
simulation then checks it with the real scheduler and balancer.
"""
from __future__ import annotations

from rayinfer.sim.cost import CostModel, RankBatch


def decode_step_s(cost: CostModel, batch: int, mean_context: float) -> float:
    b = RankBatch(tokens=batch, decode_keys=int(batch * mean_context), samples=batch)
    return cost.step([b])["seconds"]


def decode_concurrency(cost: CostModel, mean_context: float, min_tokens_per_s: float, kv_tokens: int,
                       kv_headroom: float = 0.9, limit: int = 4096) -> int:
    """Requests per rank: the most that step at >= `min_tokens_per_s` and fit `kv_headroom` of the KV cache."""
    if decode_step_s(cost, 1, mean_context) > 1 / min_tokens_per_s:
        raise ValueError(f"no decode batch reaches {min_tokens_per_s} tokens/s per request on {cost.hw.name} "
                         f"(one request steps in {decode_step_s(cost, 1, mean_context) * 1e3:.1f} ms)")
    lo, hi = 1, limit
    while lo < hi:  # step time grows with the batch
        mid = (lo + hi + 1) // 2
        if decode_step_s(cost, mid, mean_context) <= 1 / min_tokens_per_s:
            lo = mid
        else:
            hi = mid - 1
    return max(1, min(lo, int(kv_tokens * kv_headroom / mean_context)))
