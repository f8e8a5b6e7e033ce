"""A stopping rank's drain, without Ray: it waits while its gang still has requests or a peer may still get one."""
import threading
import time

from rayinfer.actors.rank import RankReplica
from rayinfer.engine.lockstep import Vote


class FakeEngine:
    def __init__(self):
        self.unfinished = False

    def has_unfinished(self):
        return self.unfinished


class FakeLockstep:
    def __init__(self, world=2):
        self.world, self.left, self.last_vote, self.store_gone = world, set(), Vote(False, False, [0.0] * world), False

    def leave(self):
        self.left.add("me")

    def all_leaving(self):
        if self.store_gone:
            raise RuntimeError("Connection reset by peer")
        return len(self.left) == self.world


class FakeLoop:
    alive = True


class Rank(RankReplica):
    def __del__(self):  # the fakes have nothing to shut down
        pass


def rank(lockstep=None, bound=5.0) -> RankReplica:
    r = object.__new__(Rank)  # the constructor needs a Serve replica context
    r.engine, r.lockstep, r.loop, r.drain_timeout_s = FakeEngine(), lockstep, FakeLoop(), bound
    return r


def later(s, fn):
    threading.Timer(s, fn).start()


def test_single_rank_stops_once_its_own_requests_end():
    r = rank()
    r.engine.unfinished = True
    later(0.3, lambda: setattr(r.engine, "unfinished", False))
    assert 0.25 < r.drain() < 2


def test_waits_for_every_peer_to_stop_and_for_the_gang_to_be_idle():
    ls = FakeLockstep()
    r = rank(ls)
    ls.last_vote = Vote(True, False, [0.0, 0.0])  # the peer still streams
    later(0.3, lambda: ls.left.add("peer"))  # the peer's own calls ended: Serve stopped it too
    later(0.6, lambda: setattr(ls, "last_vote", Vote(False, False, [0.0, 0.0])))  # the gang's last step ran
    assert 0.55 < r.drain() < 2
    assert "me" in ls.left


def test_an_idle_gang_still_waits_for_peers_that_may_get_work():
    ls = FakeLockstep()
    r = rank(ls)
    later(0.3, lambda: ls.left.add("peer"))
    assert 0.25 < r.drain() < 2


def test_bounded_and_a_gone_store_ends_the_wait():
    ls = FakeLockstep()
    assert 0.2 <= rank(ls, bound=0.2).drain() < 1  # the peer never stops: the bound ends it
    ls.store_gone = True  # rank 0, which hosts the gang's store, already exited
    t0 = time.monotonic()
    rank(ls).drain()
    assert time.monotonic() - t0 < 0.5
