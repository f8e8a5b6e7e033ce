"""Keeping a gang's ranks stepping together, and letting an idle gang sleep.

Every MoE layer is a collective, so ranks step in lockstep: before each step they vote (a
one-element all-reduce) on whether any of them has work. An idle gang does not poll: each rank
blocks on a key of the gang's TCP store ("doorbell", one key per idle period, numbered by a
counter every rank advances identically after each all-idle vote). Whoever gets work rings the
current key, which wakes every rank at once. A long heartbeat timeout bounds the sleep so a
dead peer is still noticed by the next vote.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Vote:
    busy: bool  # some rank has work: everyone steps
    rebalance: bool  # some rank asked for an expert rebalance before this step
    loads: list[float]  # every rank's expert receive load (tokens in its slots, over the window)


class Lockstep:
    """`extras()` gives this rank's (rebalance wanted, receive load) for each vote, and
    `after_vote(vote)` (optional) runs on every rank right after it, between two steps: the hooks
    the live expert balancer plugs into."""

    def __init__(self, group, store_address: tuple[str, int], world: int, rank: int, heartbeat_s: float = 30.0):
        """`group`: the gang's gloo control group (votes are host tensors, whatever the device)."""
        host, port = store_address
        connect = lambda: dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=heartbeat_s))  # noqa: E731
        self.group, self.rank = group, rank
        self._waiter = connect()  # used by the engine loop thread only
        self._ringer = connect()  # used by request-submitting threads
        self._lock = threading.Lock()
        self.epoch = 0
        self.votes = 0  # collectives run so far (steps and all-idle votes): frozen while the gang sleeps
        self.heartbeat = timedelta(seconds=heartbeat_s)
        self.world = world
        self.extras = lambda: (False, 0.0)
        self.after_vote = None
        self.last_vote = Vote(False, False, [0.0] * world)

    def _key(self, epoch: int) -> str:
        return f"rayinfer/doorbell/{epoch}"

    def ring(self) -> None:
        """Wakes the gang (safe from any thread)."""
        with self._lock:
            self._ringer.set(self._key(self.epoch), b"1")

    def ring_from_loop(self) -> None:
        self._waiter.set(self._key(self.epoch), b"1")

    def leave(self) -> None:
        """Tells the gang this rank is stopping (it will get no new request)."""
        with self._lock:
            self._ringer.set(f"rayinfer/leaving/{self.rank}", b"1")

    def all_leaving(self) -> bool:
        """Whether every rank of the gang said it is stopping: then no rank can get new work."""
        with self._lock:
            return self._ringer.check([f"rayinfer/leaving/{r}" for r in range(self.world)])

    def sleep(self) -> None:
        """Blocks until someone rings the current key, or the heartbeat passes."""
        try:
            self._waiter.wait([self._key(self.epoch)], self.heartbeat)
        except RuntimeError as e:  # the store reports a timeout as an error; a lost store is fatal
            if "timeout" not in str(e).lower() and "timed out" not in str(e).lower():
                raise

    def vote(self, local_busy: bool) -> bool:
        """Collective: True when any rank has work. After an all-idle vote the gang moves to a fresh key."""
        want_rebalance, load = self.extras()
        flags = torch.zeros(2 + self.world, dtype=torch.float64)  # [busy, rebalance, load per rank]
        flags[0], flags[1], flags[2 + self.rank] = float(local_busy), float(want_rebalance), load
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self.votes += 1
        self.last_vote = Vote(bool(flags[0]), bool(flags[1]), flags[2:].tolist())
        if self.after_vote is not None:
            self.after_vote(self.last_vote)
        if not self.last_vote.busy and not self.last_vote.rebalance:
            if self.rank == 0 and self.epoch > 0:
                self._waiter.delete_key(self._key(self.epoch - 1))
            self.epoch += 1
        return self.last_vote.busy
