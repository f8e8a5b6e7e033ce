"""Request routers for rank replicas (Ray Serve custom request routing).

`RankRouter` sends a request to the replica named by its routing hint, "<gang_id>/<rank>" or
"*/<rank>" (carried as the handle's session id): the offline driver uses it to place each
request on a chosen data-parallel rank. Requests without a hint go to the replica with the
fewest running + waiting sequences, by replica-reported stats plus this router's own count of
what it sent since those stats were taken.
"""
from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rank_hint(gang_id: str | None, rank: int) -> str:
    return f"{gang_id or '*'}/{rank}"


class RankRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # Without this Serve retries a choice that found no replica in a tight loop that never
        # yields, starving the event loop that would deliver the updated replica set.
        pending_request.routing_context.should_backoff = True
        hint = pending_request.metadata.session_id
        if hint and "/" in hint:
            gang, rank = hint.rsplit("/", 1)
            match = [r for r in candidate_replicas if str(r.replica_metadata.get("gang_rank")) == rank
                     and gang in ("*", r.replica_metadata.get("gang_id"))]
            return [match]  # empty: Serve backs off and retries until that rank is back
        return [sorted(candidate_replicas, key=lambda r: (r.routing_stats or {}).get("num_requests", 0))]
