"""Request routers for rank replicas (Ray Serve custom request routing).

`RankRouter` sends a request to the replica named by its routing hint, "<gang_id>/<rank>" or
"*/<rank>" (carried as the handle's session id): the offline driver places each request on a
chosen data-parallel rank with it. `PrefillRouter` and `DecodeRouter` are the prefill and decode
load balancers: DeepSeek's policies (rayinfer.balance.policies) over each replica's reported
load, which arrives up to a stats period late, plus what this router itself routed since
(rayinfer.balance.tracker). A request's cost travels as the `cost` keyword of the call; its
`pages` (chained keys of the prompt's full pages) let the prefill LB count, per rank, the prefix
that rank already holds (where this router sent those pages before) and, when the ranks have a
disk tier, the prefix any rank can load from disk instead of computing.
"""
from __future__ import annotations

import time
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from rayinfer.balance.policies import RankLoad, RequestCost
from rayinfer.balance.prefix_index import PrefixIndex
from rayinfer.balance.tracker import LoadTracker

_LOAD_FIELDS = ("num_requests", "prefill_tokens", "attention_work", "kv_used_tokens", "kv_capacity_tokens",
                "max_num_seqs")


def rank_hint(gang_id: str | None, rank: int) -> str:
    return f"{gang_id or '*'}/{rank}"


def _no_spin(pending_request: Optional[PendingRequest]) -> None:
    # Without this, Serve retries a choice that found no replica in a tight loop that never
    # yields, starving the event loop that would deliver the updated replica set.
    if pending_request is not None:
        pending_request.routing_context.should_backoff = True


class RankRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        _no_spin(pending_request)
        hint = pending_request.metadata.session_id if pending_request is not None else ""
        if hint and "/" in hint:
            gang, rank = hint.rsplit("/", 1)
            return [[r for r in candidate_replicas if str(r.replica_metadata.get("gang_rank")) == rank
                     and gang in ("*", r.replica_metadata.get("gang_id"))]]  # empty: wait for that rank
        return [sorted(candidate_replicas, key=lambda r: (r.routing_stats or {}).get("num_requests", 0))]


def _pin(pending_request: Optional[PendingRequest]) -> str | None:
    """The replica a call must go to, when an earlier call of the same request chose it (a dead one: none)."""
    raw = (pending_request.kwargs.get("cost") if pending_request is not None else None) or {}
    return raw.get("replica")


def request_cost(pending_request: Optional[PendingRequest]) -> RequestCost:
    raw = (pending_request.kwargs.get("cost") if pending_request is not None else None) or {}
    return RequestCost(prompt_tokens=int(raw.get("prompt_tokens", 1)), cached_tokens=int(raw.get("cached_tokens", 0)),
                       max_tokens=int(raw.get("max_tokens", 0)))


def _pages(pending_request: Optional[PendingRequest]) -> list[int]:
    raw = (pending_request.kwargs.get("cost") if pending_request is not None else None) or {}
    return list(raw.get("pages") or ())


class _BalancingRouter(RequestRouter):
    kind = ""

    def initialize_state(self, **kwargs):
        self.tracker = LoadTracker(self.kind)
        self._costs: dict[str, RequestCost] = {}
        self.prefixes = PrefixIndex()
        self.disk_tier = False  # whether the ranks report an on-disk KV tier

    def _absorb_reports(self, replicas: List[RunningReplica]) -> None:
        for r in replicas:
            stats = r.routing_stats or {}
            if "taken_at" in stats:
                load = RankLoad(**{k: stats[k] for k in _LOAD_FIELDS if k in stats})
                self.tracker.report(r.replica_id.unique_id, load, stats["taken_at"])
                self.disk_tier = self.disk_tier or "disk_max_bytes" in stats

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        _no_spin(pending_request)
        if not candidate_replicas:
            return [[]]
        self._absorb_reports(candidate_replicas)
        pinned = [r for r in candidate_replicas if r.replica_id.unique_id == _pin(pending_request)]
        if pinned:  # the second call of a request whose first one chose the rank (it holds the request's KV)
            return [pinned]
        cost = request_cost(pending_request)
        by_id = {r.replica_id.unique_id: r for r in sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)}
        ids, pages = list(by_id), _pages(pending_request)
        device = self.prefixes.device_tokens(pages, ids) if pages else None
        disk = self.prefixes.seen_tokens(pages) if pages and self.disk_tier else 0
        best = self.tracker.pick(ids, cost, time.time(), device, disk)
        return [[by_id[best]], [r for i, r in by_id.items() if i != best]]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        if _pin(pending_request) is not None:
            return  # counted when its first call was routed
        self.tracker.routed(replica_id.unique_id, request_cost(pending_request), time.time())
        self.prefixes.record(_pages(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.tracker.forget(replica_id.unique_id)
        self.prefixes.forget(replica_id.unique_id)


class PrefillRouter(_BalancingRouter):
    """Prefill LB: balances core-attention work and input tokens across prefill ranks."""

    kind = "prefill"


class DecodeRouter(_BalancingRouter):
    """Decode LB: balances KV-cache usage and request counts across decode (or mixed) ranks."""

    kind = "decode"
