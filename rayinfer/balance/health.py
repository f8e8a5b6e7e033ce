"""Which gangs the routers of one process may send work to: the failures its callers saw, at once.

Serve learns that a rank died at its next health check or when the actor's death is reported, and
until then it keeps offering the dead rank and, for a whole gang's restart, its live partners,
whose collectives are broken. The failed call is seen first in this process: Serve's router, as
the call errors with the actor's death, reports the replica (`replica_died`), the whole gang is marked
here, and every router of the process skips that gang's replicas from the next pick on. A
restarted gang comes back as new replicas, which were never marked, so it rejoins routing as soon as
Serve lists them; a mark also lapses after `ttl_s`, so that a call that failed for a passing reason
does not take a healthy gang out for good.

Crossing it: routers report the replicas they see (`saw`), dead ones (`replica_died`) and where Serve
sent each attempt (`routed`); the ingress asks whether an attempt was routed yet (a call still waiting
for a gang is bounded by its deadline, a routed one is not) and whether a role has any gang left.
Plain Python, one instance per process (`HEALTH`): the ingress and the routers it owns share it, reading
it as `health.HEALTH` (Serve ships their classes by value: a name bound at import would be copied).
"""
from __future__ import annotations

import time
from collections import OrderedDict


class GangHealth:
    def __init__(self, ttl_s: float = 30.0, max_attempts: int = 100_000):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s, self.max_attempts = ttl_s, max_attempts
        self.gang_of: dict[str, str] = {}  # replica id -> gang id
        self.role_of: dict[str, str] = {}  # replica id -> role
        self.excluded: dict[str, float] = {}  # replica id -> when its gang was marked failed
        self.attempts: OrderedDict[str, str] = OrderedDict()  # attempt key -> replica id it was routed to
        self.failures = 0

    def saw(self, role: str, replica_id: str, gang_id: str | None) -> None:
        self.gang_of[replica_id] = gang_id or replica_id
        self.role_of[replica_id] = role

    def routed(self, attempt: str | None, replica_id: str) -> None:
        if attempt is None:
            return
        self.attempts[attempt] = replica_id
        while len(self.attempts) > self.max_attempts:  # attempts whose caller never released them
            self.attempts.popitem(last=False)

    def was_routed(self, attempt: str) -> bool:
        return attempt in self.attempts

    def release(self, attempt: str) -> str | None:
        """Forgets an attempt (its call ended); -> the replica it went to, if it was routed."""
        return self.attempts.pop(attempt, None)

    def replica_died(self, replica_id: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        gang = self.gang_of.get(replica_id, replica_id)
        for r, g in self.gang_of.items():
            if g == gang:
                self.excluded[r] = now
        self.excluded[replica_id] = now
        self.failures += 1
        return gang

    def usable(self, replica_id: str, now: float | None = None) -> bool:
        at = self.excluded.get(replica_id)
        if at is None:
            return True
        if (time.time() if now is None else now) - at > self.ttl_s:
            del self.excluded[replica_id]
            return True
        return False

    def available(self, role: str, now: float | None = None) -> bool:
        """Whether any replica of `role` seen so far may be routed to (True while none has been seen:
        the router then waits for Serve's list, as before any failure)."""
        seen = [r for r, ro in self.role_of.items() if ro == role]
        return not seen or any(self.usable(r, now) for r in seen)

    def forget(self, replica_id: str) -> None:
        """A replica Serve no longer lists: nothing more is routed to it, so its entries can go."""
        self.gang_of.pop(replica_id, None)
        self.role_of.pop(replica_id, None)
        self.excluded.pop(replica_id, None)


HEALTH = GangHealth()
