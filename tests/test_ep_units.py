"""Expert-parallel building blocks without processes: placement, payload packing, microbatch scheduling, and the
DeepEP adapter on a gang of threads against a fake that enforces the library's limits (tests/fake_deepep.py)."""
import pytest
import torch

from rayinfer.balance.placement import ExpertPlacement
from rayinfer.engine.overlap import balanced_split, run_interleaved
from rayinfer.kernels.dispatch import LocalDispatcher, _pack, _unpack


def test_initial_placement_and_local_experts():
    p = ExpertPlacement.initial([1, 2], num_logical=16, num_redundant=4, ep_size=4)
    assert p.slots_per_rank == 5 and p.num_slots == 20
    assert p.local_experts(3)[1] == [15, 0, 1, 2, 3]
    assert p.logcnt[0].tolist() == [2] * 4 + [1] * 12
    assert p.log2phy[0, 0].tolist() == [0, 16] and p.log2phy[0, 9].tolist() == [9, -1]


def test_route_spreads_replicas_deterministically():
    p = ExpertPlacement.initial([0], num_logical=8, num_redundant=8, ep_size=4)  # every expert twice
    idx = torch.zeros(100, 1, dtype=torch.long)  # 100 tokens all choosing expert 0
    slots = p.route(0, idx, rank=0)
    assert set(slots.flatten().tolist()) == {0, 8}
    assert abs((slots == 0).sum().item() - 50) <= 1  # load split evenly over the two copies
    assert torch.equal(slots, p.route(0, idx, rank=0))


def test_invalid_redundancy_is_a_clear_error():

    with pytest.raises(ValueError, match="num_redundant_experts=3"):
        ExpertPlacement.initial([0], num_logical=16, num_redundant=3, ep_size=4)


def test_payload_roundtrip_plain_and_fp8():
    x = torch.randn(7, 200)
    meta = torch.cat([torch.randint(-1, 5, (7, 4)).float(), torch.rand(7, 4)], dim=1)
    for dtype in (torch.float32, torch.bfloat16):
        back, m = _unpack(_pack(x.to(dtype), meta, False), 200, dtype, 8, False)
        assert torch.equal(back, x.to(dtype)) and torch.equal(m, meta)
    back, m = _unpack(_pack(x, meta, True), 200, torch.float32, 8, True)
    assert torch.equal(m, meta) and (back - x).abs().max() <= x.abs().max() / 16  # e4m3 per 1x128 group


def test_local_dispatcher_is_identity():
    d = LocalDispatcher()
    x, s, w = torch.randn(3, 4), torch.tensor([[0, 1]] * 3), torch.rand(3, 2)
    r = d.dispatch_wait(d.dispatch_launch(x, s, w))
    assert r.x is x and d.combine_wait(d.combine_launch(x, r)) is x


def test_balanced_split():
    a, b = balanced_split([100, 1, 1, 50, 49])
    assert sorted(a + b) == [0, 1, 2, 3, 4]
    costs = [100, 1, 1, 50, 49]
    assert abs(sum(costs[i] for i in a) - sum(costs[i] for i in b)) <= 2


def test_interleaving_alternates_microbatches():
    trace = []

    def mb(name, n):
        for i in range(n):
            trace.append((name, i))
            yield
        return name

    assert run_interleaved([mb("a", 3), mb("b", 3)]) == ["a", "b"]
    assert trace == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


# ---- DeepEP adapter, against a fake that enforces the library's limits (tests/fake_deepep.py) -----------------

def _gang(world: int, fn):
    """Runs fn(rank, group) on `world` threads sharing one fake fabric; returns their results, raising the first
    real failure (a rank that fails leaves the others at a broken barrier)."""
    import threading

    import fake_deepep

    fabric = fake_deepep.Fabric(world)
    results, errors = [None] * world, [None] * world

    def run(r):
        try:
            results[r] = fn(r, fake_deepep.Group(r, fabric))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[r] = e
            fabric.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real or any(errors):
        raise (real or [e for e in errors if e])[0]
    return results


@pytest.fixture
def fake_deep_ep(monkeypatch):
    import fake_deepep

    from rayinfer.kernels import backends

    monkeypatch.setattr(backends, "module", lambda name: fake_deepep.Module if name == "deep_ep" else None)
    fake_deepep.Buffer.calls = []
    return fake_deepep


def test_deepep_decode_rank_runs_a_reprefill_step_in_normal_mode(fake_deep_ep):
    """A decode gang: decode-sized steps on the low-latency kernels (sized for the decode step, not 128), a
    re-prefill of 300 tokens on one rank in normal mode on every rank, then low-latency again after a clean."""
    from rayinfer.kernels import probe
    from rayinfer.kernels.deepep import DeepEPDispatcher, round_trip

    spr, hidden = 2, 2048
    steps = [(5, 3), (300, 3), (2, 8)]  # tokens of rank 0 and rank 1 in each step

    def rank(r, group):
        d = DeepEPDispatcher(group, spr * 2, hidden, max_step_tokens=512, low_latency_tokens=8, topk=2)
        assert d.ll_tokens == 8 and d.normal
        g = torch.Generator().manual_seed(r)
        errs = []
        for sizes in steps:
            d.plan_step(max(sizes))  # what EPContext's vote hands every rank
            n = sizes[r]
            x = torch.randn(n, hidden, generator=g).bfloat16()
            slots, weights = torch.randint(0, spr * 2, (n, 2), generator=g), torch.rand(n, 2, generator=g)
            got, want = round_trip(d, x, slots, weights, spr)
            errs.append(probe.rel_err(got, want))
        return errs

    for errs in _gang(2, rank):
        assert all(e < 2e-2 for e in errs), errs
    ops = [op for r, op in fake_deep_ep.Buffer.calls if r == 0]
    assert ops == ["ll_dispatch", "ll_combine", "layout", "dispatch", "combine", "clean", "ll_dispatch", "ll_combine"]


def test_deepep_low_latency_sized_for_128_cannot_take_a_reprefill(fake_deep_ep):
    """The old sizing (low-latency only, 128 tokens a rank) meets a 300-token re-prefill: the library refuses it."""
    from rayinfer.kernels.deepep import DeepEPDispatcher

    def rank(r, group):
        d = DeepEPDispatcher(group, 4, 2048, max_step_tokens=128, low_latency_tokens=128, topk=2)
        n = 300 if r == 0 else 3
        d.dispatch_launch(torch.randn(n, 2048), torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2))

    with pytest.raises(AssertionError, match="tokens > max 128"):
        _gang(2, rank)


def test_deepep_ranks_that_plan_differently_would_hang(fake_deep_ep):
    """Why the mode comes from the gang's vote: a rank choosing by its own step size issues other kernels."""
    from rayinfer.kernels.deepep import DeepEPDispatcher, round_trip

    def rank(r, group):
        d = DeepEPDispatcher(group, 4, 2048, max_step_tokens=512, low_latency_tokens=8, topk=2)
        n = 300 if r == 0 else 3
        d.plan_step(n)  # its own size, not the gang's
        round_trip(d, torch.randn(n, 2048).bfloat16(), torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2), 2)

    with pytest.raises(AssertionError, match="different collectives"):
        _gang(2, rank)


def test_deepep_sizes_and_limits(fake_deep_ep):
    from rayinfer.kernels.deepep import LL_MAX_TOKENS, DeepEPDispatcher, low_latency_size

    assert low_latency_size(3, 5, 7168, 8) == 8  # 3 x 8 is a multiple of 4
    assert low_latency_size(2, 64, 7168, 8) == 64 and low_latency_size(2, 64, 1000, 8) == 0  # unsupported hidden
    assert low_latency_size(2, LL_MAX_TOKENS + 1, 7168, 8) == 0 and low_latency_size(2, 64, 7168, 12) == 0

    def rank(r, group):
        small = DeepEPDispatcher(group, 4, 2048, max_step_tokens=8, low_latency_tokens=8, topk=2)
        assert not small.normal and small.buffer.nvl == 0  # every step fits: no normal buffers, no vote needed
        prefill = DeepEPDispatcher(group, 4, 2048, max_step_tokens=4096)
        assert prefill.ll_tokens == 0 and not prefill.buffer.low_latency_mode
        hybrid = DeepEPDispatcher(group, 4, 2048, max_step_tokens=512, low_latency_tokens=8, topk=2)
        with pytest.raises(AssertionError, match="plan_step"):
            hybrid.dispatch_launch(torch.randn(3, 2048), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
        return True

    assert _gang(2, rank) == [True, True]


def test_deepep_handles_are_combined_once(fake_deep_ep):
    from rayinfer.kernels.deepep import DeepEPDispatcher

    def rank(r, group):
        d = DeepEPDispatcher(group, 4, 2048, max_step_tokens=8, low_latency_tokens=8, topk=2)
        x, s, w = torch.randn(3, 2048), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
        h = d.dispatch_launch(x, s, w)
        recv = d.dispatch_wait(h)
        assert torch.isfinite(recv.x).all()  # read after the receive hook, never before
        d.combine_wait(d.combine_launch(recv.x, h))
        d.combine_launch(recv.x, h)

    with pytest.raises(AssertionError, match="combined twice"):
        _gang(2, rank)


def test_ep_context_hands_the_gangs_largest_step_to_the_dispatcher(monkeypatch):
    import torch.distributed as dist

    from rayinfer.engine.ep import EPContext

    planned = []

    class SizeAware(LocalDispatcher):
        def plan_step(self, most):
            planned.append(most)

    def all_reduce(t, op=None, group=None):  # another rank of the gang runs a 300-token re-prefill
        t.copy_(torch.maximum(t, torch.tensor([300])))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    placement = ExpertPlacement.initial([1], num_logical=8, num_redundant=0, ep_size=2)
    for overlap, min_tokens in ((False, 0), (True, 0), (True, 32)):
        ctx = EPContext(0, placement, SizeAware(), overlap=overlap, control=object(), overlap_min_tokens=min_tokens)
        assert ctx.num_microbatches(3) == (2 if overlap else 1)
    assert planned == [300, 300, 300]


def test_a_decode_rank_sizes_its_dispatcher_for_its_real_steps(monkeypatch):
    """The rank passes the scheduler's largest step (re-prefills included) and a decode step's size."""
    import rayinfer.engine.rank as rank_mod
    from rayinfer.config import EngineConfig

    seen = {}

    class Stop(Exception):
        pass

    def make(*args, **kwargs):
        seen.update(zip(("group", "rank", "world", "spr", "hidden", "device", "max_step_tokens", "low_latency_tokens",
                         "topk"), args), **kwargs)
        raise Stop

    monkeypatch.setattr(rank_mod, "make_dispatcher", make)
    for mode, ll in (("decode", 16), ("prefill", 0)):
        config = EngineConfig.from_options("tiny", ep_size=2, scheduler_mode=mode, max_num_batched_tokens=512,
                                           max_num_seqs=16)
        with pytest.raises(Stop):
            rank_mod.build_rank_engine(config, 0, rank_mod.GangGroups(None, None))
        assert seen["max_step_tokens"] == 512 and seen["low_latency_tokens"] == ll and seen["topk"] >= 1
