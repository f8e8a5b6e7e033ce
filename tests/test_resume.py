"""The ingress's resume path without Ray: fake rank handles whose calls fail on cue show that a choice goes on
from the tokens the client already has (no gap, no repeat, one finish reason), that the failed gang leaves
routing at once and comes back as new replicas, that a refused request is a 400 and not resumed, that a request
a rank failed alone is a 500 and not resumed, that a choice whose ranks fail twice is quarantined and resumes
are bounded, and that with no gang to take it a choice ends in a 503 after the deadline."""
import asyncio

import pytest

from rayinfer.actors.choice import own_seed
from rayinfer.actors.resume import ChoiceRunner
from rayinfer.balance.health import HEALTH, GangHealth
from rayinfer.messages import Delta, EngineRequest, KVHandoff, RequestFailed, SamplingParams, pack, unpack
from rayinfer.openai.protocol import APIError

PROMPT = [5, 6, 7]
MAX = 10


def token(pos: int) -> int:
    return 40 + pos  # what any healthy rank samples at output position `pos`


def expected() -> list[int]:
    return [token(p) for p in range(MAX)]


class Call:
    """A rank call: awaitable (unary) and async-iterable (stream); routed at once unless `stuck`."""

    def __init__(self, result=None, items=(), fail_after=None, error=None, stuck=False):
        self.result, self.items, self.fail_after, self.error, self.stuck = result, list(items), fail_after, error, stuck
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        return self._get().__await__()

    async def _get(self):
        if self.stuck:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        return self.result

    async def __aiter__(self):
        if self.stuck:
            await asyncio.sleep(3600)
        for n, item in enumerate(self.items):
            if self.fail_after is not None and n == self.fail_after:
                raise self.error
            await asyncio.sleep(0)
            yield item
        if self.fail_after is not None and self.fail_after >= len(self.items):
            raise self.error


class Channel:
    """A rank replica's channel to the ingress: the packed delta lists its calls put, then the error that ended it."""

    def __init__(self, box: asyncio.Queue):
        self.box = box

    def cancel(self):
        pass

    async def __aiter__(self):
        while True:
            item = await self.box.get()
            if isinstance(item, BaseException):
                raise item
            yield item


class Role:
    """A role's handle: each call goes to the next replica in `replicas` (gang id, replica id) and does what
    `plan` says for that call number: "ok", "fail" (after a token), "refuse", "blame" (the rank fails this request
    alone, after a token), "migrate", "stuck". A `run` call yields the replica's id and ends with the request;
    its deltas go on that replica's `channel`, as RankReplica's do (or, with `via_channel` false, on the call)."""

    via_channel = True

    def __init__(self, role, replicas, plan):
        self.role, self.replicas, self.plan, self.calls = role, replicas, list(plan), []
        self.boxes: dict[str, asyncio.Queue] = {}
        for gang, rid in replicas:
            HEALTH.saw(role, rid, gang)

    def options(self, **_):
        return self

    def __getattr__(self, method):
        role = self

        class Method:
            def remote(self, *args, cost=None):
                return role.call(method, args, cost)
        return Method()

    def call(self, method, args, cost):
        if method == "channel":  # pinned to the replica in `cost`, as the routers pin it
            return Channel(self.boxes.setdefault(cost["replica"], asyncio.Queue()))
        what = self.plan.pop(0) if self.plan else "ok"
        usable = [rid for _, rid in self.replicas if HEALTH.usable(rid)]
        self.calls.append((method, what, usable[0] if usable else None))
        if what == "stuck" or not usable:
            return Call(stuck=True)
        HEALTH.routed(cost["attempt"], usable[0])
        if what == "fail":  # as Serve's router does when a call fails with the actor's death
            HEALTH.replica_died(usable[0])
        if what == "refuse":
            return Call(error=ValueError("prompt too long"))
        if method == "accept_kv":
            return Call(result=usable[0])
        req = unpack(args[0], EngineRequest)
        start = len(req.output_token_ids)
        if method == "prefill":
            if what == "fail":
                return Call(error=RuntimeError("The actor died unexpectedly"))
            first = Delta(req.request_id, [token(0)], text="t0 ", finish_reason="handoff", num_prompt_tokens=3)
            return Call(result=(pack(first), KVHandoff([], 3, 0.0, "g/0", None)))
        assert method == "run"
        items = [Delta(req.request_id, [token(p)], text=f"t{p} ", num_prompt_tokens=3,
                       finish_reason="length" if p == MAX - 1 else None) for p in range(start, MAX)]
        if what == "migrate":
            items = items[:1] + [Delta(req.request_id, [], finish_reason="migrate")]
        died = RuntimeError("ActorDiedError: the actor died unexpectedly")
        blamed = RequestFailed("request 'r-0' failed in sampling: IndexError")
        if not self.via_channel:  # the rank streams the deltas on the call itself
            packed = [pack(d) for d in items]
            if what == "blame":
                return Call(items=packed, fail_after=1, error=blamed)
            return Call(items=packed, fail_after=2 if what == "fail" else None, error=died if what == "fail" else None)
        box = self.boxes.setdefault(usable[0], asyncio.Queue())
        if what == "blame":  # the rank goes on; only this request's call fails
            box.put_nowait(pack(items[:1]))
            return Call(items=[usable[0]], fail_after=1, error=blamed)
        if what == "fail":  # the rank dies: its channel and its calls fail
            for d in items[:2]:
                box.put_nowait(pack([d]))
            box.put_nowait(died)
            return Call(items=[usable[0]], fail_after=1, error=died)
        box.put_nowait(pack(items))  # one batch: the consumer takes them as they come
        return Call(items=[usable[0]])


@pytest.fixture(autouse=True, params=["channel", "per-call"])
def delta_path(request, monkeypatch):
    """Every test both ways a rank can send a choice's deltas: on the ingress's channel, or on the choice's call."""
    monkeypatch.setattr(Role, "via_channel", request.param == "channel")
    return request.param


@pytest.fixture(autouse=True)
def fresh_health(monkeypatch):  # each test its own registry, seen by the runner and by these fakes
    h = GangHealth(ttl_s=30.0)
    monkeypatch.setattr("rayinfer.balance.health.HEALTH", h)
    globals()["HEALTH"] = h
    yield h


def run(runner, req):
    async def go():
        return [d async for d in runner.run(req)]
    return asyncio.run(go())


def request():
    return EngineRequest("r-0", PROMPT, SamplingParams(max_tokens=MAX, temperature=0, ignore_eos=True))


def check_whole(deltas):
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == expected(), tokens
    assert "".join(d.text for d in deltas) == "".join(f"t{p} " for p in range(MAX))
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]


def test_decode_failure_resumes_on_the_other_gang_from_the_emitted_tokens():
    prefill = Role("prefill", [("P", "p0"), ("P", "p1")], ["ok"])
    decode = Role("decode", [("A", "a0"), ("A", "a1"), ("B", "b0"), ("B", "b1")], ["ok", "fail", "ok"])
    runner = ChoiceRunner(prefill, decode, deadline_s=5)
    req = request()
    check_whole(run(runner, req))
    assert runner.resumed == 1
    # the second decode call went to gang B: the whole of gang A left routing at the failure
    assert decode.calls[-1][2] == "b0" and not HEALTH.usable("a0") and not HEALTH.usable("a1")
    assert HEALTH.usable("b1") and HEALTH.available("decode")
    assert req.output_token_ids == expected() and req.emitted_chars == len("".join(f"t{p} " for p in range(MAX)))
    assert not runner.channels.queues and not runner.channels.replica_of  # each attempt let go of its queue


def test_prefill_failure_goes_to_a_decode_rank_that_prefills():
    prefill = Role("prefill", [("P", "p0"), ("P", "p1")], ["fail"])
    decode = Role("decode", [("A", "a0"), ("A", "a1")], [])
    runner = ChoiceRunner(prefill, decode, deadline_s=5)
    check_whole(run(runner, request()))
    assert not HEALTH.available("prefill")  # its only gang is down: later choices start on decode ranks
    assert [c[0] for c in prefill.calls] == ["prefill"] and [c[0] for c in decode.calls] == ["run"]
    check_whole(run(runner, EngineRequest("r-1", PROMPT, request().params)))
    assert len(prefill.calls) == 1


def test_restarted_gang_rejoins_as_new_replicas():
    HEALTH.saw("decode", "a0", "A")
    HEALTH.saw("decode", "a1", "A")
    assert HEALTH.replica_died("a1") == "A" and not HEALTH.usable("a0") and not HEALTH.available("decode")
    HEALTH.forget("a0"), HEALTH.forget("a1")
    HEALTH.saw("decode", "a2", "A2")
    assert HEALTH.available("decode") and HEALTH.usable("a2")
    h = GangHealth(ttl_s=1.0)
    h.saw("decode", "z", "Z")
    h.replica_died("z", now=100.0)
    assert not h.usable("z", now=100.5) and h.usable("z", now=101.5)  # a mark lapses: a passing error


def test_refused_request_is_a_400_and_not_resumed():
    prefill = Role("prefill", [("P", "p0")], ["refuse"])
    decode = Role("decode", [("A", "a0")], [])
    with pytest.raises(APIError) as e:
        run(ChoiceRunner(prefill, decode, deadline_s=5), request())
    assert e.value.status == 400 and "prompt too long" in e.value.message
    assert not decode.calls and HEALTH.usable("p0")


def test_no_healthy_gang_within_the_deadline_is_a_503():
    prefill = Role("prefill", [("P", "p0")], ["ok"])
    decode = Role("decode", [("A", "a0"), ("A", "a1")], ["ok", "fail"])
    with pytest.raises(APIError) as e:
        run(ChoiceRunner(prefill, decode, deadline_s=0.3), request())
    assert e.value.status == 503 and "no healthy decode gang" in e.value.message


def test_a_drained_rank_gives_the_request_back():
    prefill = Role("prefill", [("P", "p0")], ["ok"])
    decode = Role("decode", [("A", "a0"), ("B", "b0")], ["ok", "migrate", "ok"])
    runner = ChoiceRunner(prefill, decode, deadline_s=5)
    check_whole(run(runner, request()))
    assert runner.resumed == 1 and HEALTH.usable("a0")


def test_a_request_the_rank_failed_alone_is_a_500_and_not_resumed():
    prefill = Role("prefill", [("P", "p0")], ["ok"])
    decode = Role("decode", [("A", "a0"), ("B", "b0")], ["ok", "blame"])
    runner = ChoiceRunner(prefill, decode, deadline_s=5)
    with pytest.raises(APIError) as e:
        run(runner, request())
    assert e.value.status == 500 and "failed in sampling" in e.value.message and "not retried" in e.value.message
    assert [c[0] for c in decode.calls] == ["accept_kv", "run"] and runner.resumed == 0
    assert HEALTH.usable("a0") and HEALTH.usable("b0")  # the rank blamed the request, not itself


def test_a_request_whose_ranks_fail_twice_is_quarantined():
    prefill = Role("prefill", [("P", "p0")], ["ok"])
    decode = Role("decode", [("A", "a0"), ("B", "b0"), ("C", "c0")], ["ok", "fail", "fail", "ok"])
    runner = ChoiceRunner(prefill, decode, deadline_s=5)
    with pytest.raises(APIError) as e:
        run(runner, request())
    assert e.value.status == 500 and "quarantined" in e.value.message
    assert [c[2] for c in decode.calls] == ["a0", "a0", "b0"], "a third gang was tried"
    assert runner.quarantined == 1 and runner.resumed == 1 and HEALTH.usable("c0")


def test_resumes_are_bounded():
    prefill = Role("prefill", [("P", "p0")], ["ok"])
    decode = Role("decode", [("A", "a0")], ["ok"] + ["migrate"] * 5)
    runner = ChoiceRunner(prefill, decode, deadline_s=5, max_resumes=2)
    with pytest.raises(APIError) as e:
        run(runner, request())
    assert e.value.status == 503 and "moved between ranks 2 times" in e.value.message
    assert len(decode.calls) == 4 and runner.resumed == 2  # accept_kv + three decode calls, no more


def test_unseeded_sampled_choices_get_a_seed_greedy_ones_need_none():
    sampled = own_seed(SamplingParams(temperature=0.8), 0)
    assert isinstance(sampled.seed, int) and sampled.seed >= 0
    assert own_seed(SamplingParams(temperature=0), 0).seed is None
    assert own_seed(SamplingParams(seed=5), 0).seed == 5 and own_seed(SamplingParams(seed=5), 1).seed != 5


def _replica(rid, gang):
    from types import SimpleNamespace

    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), replica_metadata={"gang_id": gang},
                           routing_stats={})


def test_decode_router_skips_a_dead_ranks_whole_gang_and_takes_its_replacement():
    from types import SimpleNamespace

    from rayinfer.actors.router import DecodeRouter

    router = DecodeRouter.__new__(DecodeRouter)  # its state only: no Serve around it
    router.initialize_state()
    pending = SimpleNamespace(kwargs={"cost": {"prompt_tokens": 4, "max_tokens": 8}},
                              routing_context=SimpleNamespace(should_backoff=False))

    def pick(replicas):
        groups = asyncio.run(router.choose_replicas(replicas, pending))
        return {r.replica_id.unique_id for g in groups for r in g}

    gang_a, gang_b = [_replica("a0", "A"), _replica("a1", "A")], [_replica("b0", "B"), _replica("b1", "B")]
    assert pick(gang_a + gang_b) == {"a0", "a1", "b0", "b1"}
    HEALTH.replica_died("a0")  # Serve's router, as a call to a0 fails with the actor's death
    assert pick(gang_a + gang_b) == {"b0", "b1"}, "a0's live partner must leave routing with it"
    HEALTH.replica_died("b1")
    assert pick(gang_a + gang_b) == set() and not HEALTH.available("decode")  # calls wait, bounded by the deadline
    restarted = [_replica("a2", "A2"), _replica("a3", "A2")]
    assert pick(gang_b + restarted) == {"a2", "a3"} and HEALTH.available("decode")
