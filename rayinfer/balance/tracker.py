"""What one router believes each rank's load is: the rank's last report plus this router's
own routing since that report was taken.

Replicas report stats about once per stats period and the router holds them up to a period
late, so a burst routed on reports alone lands on whichever rank looked lightest, all of it.
Counting what this router sent since the report (and, when the caller knows, what finished)
keeps the loads moving between reports. Plain Python; the Serve request routers own one each.
"""

from collections import defaultdict
from dataclasses import dataclass, replace

from rayinfer.balance.policies import (RankLoad, RequestCost, pick_decode_rank, pick_prefill_rank,
                                      prefer_prefix_holder)

KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class _Route:
    at: float
    cost: RequestCost


def _delta(kind: str, cost: RequestCost) -> tuple[int, int, float, int]:
    """(requests, prefill tokens, attention work, KV tokens) one request adds to a rank."""
    if kind == "prefill":
        # Cached prompt blocks are already resident on the prefill rank; only new ones are added.
        return 1, cost.uncached, cost.attention_work, cost.uncached
    return 1, 0, 0.0, cost.kv_tokens


class LoadTracker:
    """Reported stats + own routing since the report, per rank id (str).

    `grace_s` widens "since the report" backwards: a request routed just before a report was
    taken may not have reached the replica's queue yet (transport, admission, clock skew
    between router and replica), and counting it twice for one period is cheaper than missing
    it, which is what lets a burst pile onto one rank.
    """

    def __init__(self, kind: str, grace_s: float = 0.1):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.kind, self.grace_s = kind, grace_s
        self._reports: dict[str, tuple[RankLoad, float]] = {}
        self._routes: dict[str, list[_Route]] = defaultdict(list)
        # Requests finished after the report was taken but counted in it: subtracted until the
        # next report, which no longer counts them.
        self._done: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0])
        # Largest kv_capacity_tokens and max_num_seqs reported so far, for unreported ranks.
        self._sizes: dict[str, int] = {}

    def report(self, rank_id: str, load: RankLoad, taken_at: float) -> None:
        held = self._reports.get(rank_id)
        if held is not None and taken_at < held[1]:
            return  # reports can overtake each other in transit; keep the newest
        self._reports[rank_id] = (replace(load), taken_at)
        cutoff = taken_at - self.grace_s
        self._routes[rank_id] = [r for r in self._routes[rank_id] if r.at > cutoff]
        self._done.pop(rank_id, None)
        for name in ("kv_capacity_tokens", "max_num_seqs"):
            self._sizes[name] = max(self._sizes.get(name, 0), getattr(load, name))

    def routed(self, rank_id: str, cost: RequestCost, at: float) -> None:
        self._routes[rank_id].append(_Route(at, cost))

    def finished(self, rank_id: str, cost: RequestCost, at: float) -> None:
        """Optional: the caller learnt that a request it routed to `rank_id` left the rank
        (prefill done and handed off; decode stream ended) at time `at`."""
        routes = self._routes.get(rank_id, [])
        for i, r in enumerate(routes):
            if r.cost == cost:
                del routes[i]  # oldest matching route: still counted, stop counting it
                return
        held = self._reports.get(rank_id)
        if held is not None and at > held[1]:
            done = self._done[rank_id]
            for j, d in enumerate(_delta(self.kind, cost)):
                done[j] += d

    def forget(self, rank_id: str) -> None:
        """Drop a rank that left the deployment."""
        self._reports.pop(rank_id, None)
        self._routes.pop(rank_id, None)
        self._done.pop(rank_id, None)

    def effective(self, rank_id: str, now: float) -> RankLoad:
        """The report plus routes made after (taken_at - grace_s) and up to `now`, less
        finished requests the report counted. A rank not heard from yet counts as idle and as
        large as the largest reported one: new replicas start empty, and taking them for full
        would pile everything on whichever rank reported first."""
        held = self._reports.get(rank_id)
        load = held[0] if held else RankLoad(**self._sizes)
        n, tok, attn, kv = 0, 0, 0.0, 0
        for r in self._routes.get(rank_id, ()):
            if r.at <= now:
                dn, dt, da, dk = _delta(self.kind, r.cost)
                n, tok, attn, kv = n + dn, tok + dt, attn + da, kv + dk
        if rank_id in self._done:
            dn, dt, da, dk = self._done[rank_id]
            n, tok, attn, kv = n - dn, tok - dt, attn - da, kv - dk
        return replace(load,
                       num_requests=max(0, load.num_requests + n),
                       prefill_tokens=max(0, load.prefill_tokens + tok),
                       attention_work=max(0.0, load.attention_work + attn),
                       kv_used_tokens=max(0, load.kv_used_tokens + kv))

    def loads(self, rank_ids: list[str], now: float) -> list[RankLoad]:
        return [self.effective(r, now) for r in rank_ids]

    def pick(self, rank_ids: list[str], cost: RequestCost, now: float, device_hits: list[int] | None = None,
             disk_hit: int = 0) -> str:
        """The rank the kind's policy picks on effective loads. Does not record the route:
        call `routed` once the request is actually sent (Serve may retry elsewhere)."""
        if not rank_ids:
            raise ValueError("no ranks to pick from (rank_ids is empty)")
        if self.kind == "prefill":
            loads = self.loads(rank_ids, now)
            best = pick_prefill_rank(loads, cost, device_hits, disk_hit)
            return rank_ids[prefer_prefix_holder(loads, best, device_hits, disk_hit) if device_hits else best]
        return rank_ids[pick_decode_rank(self.loads(rank_ids, now), cost)]
