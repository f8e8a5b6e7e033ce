"""Expert-parallel building blocks without processes: placement, payload packing, microbatch scheduling."""
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
    import pytest

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
