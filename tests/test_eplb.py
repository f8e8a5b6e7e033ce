"""Tests for rayinfer.balance.eplb: valid placements under both policies, the published
example, never worse than the published greedy policy, determinism, and argument errors."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from rayinfer.balance.eplb import balancedness, gpu_loads, rebalance_experts


def _load_greedy():
    # The reference port lives with the benchmark so the library stays free of it.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_greedy_eplb.py"
    spec = importlib.util.spec_from_file_location("_greedy_eplb", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.greedy_rebalance


greedy_rebalance = _load_greedy()

EXAMPLE_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                               [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
EXAMPLE_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])

# (experts, slots, groups, nodes, gpus); hierarchical when groups % nodes == 0.
HIER = [(12, 16, 4, 2, 8), (64, 80, 8, 2, 16), (32, 48, 4, 4, 8), (8, 16, 4, 2, 16),
        (256, 288, 8, 4, 32), (48, 64, 16, 4, 8)]
GLOBAL = [(64, 96, 8, 3, 12), (12, 12, 4, 3, 6), (20, 30, 4, 3, 3), (256, 288, 8, 18, 144)]


def loads(kind, layers, experts, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(layers, experts, generator=gen, dtype=torch.float64) * 100
    if kind == "zipf":
        base = torch.arange(1, experts + 1, dtype=torch.float64) ** -1.1
        w = torch.stack([base[torch.randperm(experts, generator=gen)] for _ in range(layers)])
        return torch.poisson(w / w.sum(1, keepdim=True) * 1e5, generator=gen)
    if kind == "lognormal":
        return (torch.randn(layers, experts, generator=gen, dtype=torch.float64) * 0.8).exp()
    w = torch.randint(0, 50, (layers, experts), generator=gen)  # "sparse": ints, many zeros
    w[torch.rand(layers, experts, generator=gen) < 0.5] = 0
    w[0] = 0  # one layer with no load at all
    return w


def counts_of(phy2log, experts):
    return torch.zeros(phy2log.shape[0], experts, dtype=torch.int64).scatter_add_(
        1, phy2log, torch.ones_like(phy2log))


def max_load(weight, phy2log, num_gpus):
    return gpu_loads(weight, phy2log, counts_of(phy2log, weight.shape[1]), num_gpus).max(1).values


def check_valid(weight, out, slots, groups, nodes, gpus):
    phy2log, log2phy, logcnt = out
    layers, experts = weight.shape
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (layers, slots) and logcnt.shape == (layers, experts)
    assert ((phy2log >= 0) & (phy2log < experts)).all()
    assert (logcnt >= 1).all()
    assert torch.equal(logcnt, counts_of(phy2log, experts))
    # log2phy: each expert's slots, ascending, then -1 padding; width = most replicas.
    assert log2phy.shape == (layers, experts, int(logcnt.max()))
    valid = log2phy >= 0
    assert torch.equal(valid.sum(-1), logcnt)
    assert (valid[..., 1:] <= valid[..., :-1]).all()
    owner = phy2log.gather(1, log2phy.clamp_min(0).flatten(1)).view_as(log2phy)
    assert (owner == torch.arange(experts)[None, :, None])[valid].all()
    assert ((log2phy[..., 1:] > log2phy[..., :-1]) | ~valid[..., 1:]).all()
    # Every slot is one of the num_gpus equal blocks; all load lands on some GPU.
    load = gpu_loads(weight, phy2log, logcnt, gpus)
    assert load.shape == (layers, gpus)
    torch.testing.assert_close(load.sum(1), weight.double().sum(1))
    if groups % nodes == 0:
        size = experts // groups
        node = torch.arange(slots) // (slots // nodes)  # [R]
        for layer in range(layers):
            seen = torch.zeros(groups, nodes, dtype=torch.bool)
            seen[phy2log[layer] // size, node] = True
            assert (seen.sum(1) == 1).all(), "a group spans nodes"
            assert (seen.sum(0) == groups // nodes).all(), "nodes got unequal group counts"


@pytest.mark.parametrize("shape", HIER + GLOBAL)
@pytest.mark.parametrize("kind", ["uniform", "zipf", "sparse"])
def test_valid_placement(shape, kind):
    experts, slots, groups, nodes, gpus = shape
    w = loads(kind, 3, experts, seed=experts + slots)
    check_valid(w, rebalance_experts(w, slots, groups, nodes, gpus), slots, groups, nodes, gpus)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16, torch.bfloat16, torch.float32])
def test_any_numeric_dtype(dtype):
    w = (loads("uniform", 2, 12, seed=1)).to(dtype)
    check_valid(w, rebalance_experts(w, 16, 4, 2, 8), 16, 4, 2, 8)


def test_published_example_max_load_not_exceeded():
    ours = max_load(EXAMPLE_WEIGHT, rebalance_experts(EXAMPLE_WEIGHT, 16, 4, 2, 8)[0], 8)
    published = max_load(EXAMPLE_WEIGHT, EXAMPLE_PHY2LOG, 8)
    torch.testing.assert_close(published, torch.tensor([156.0, 179.5], dtype=torch.float64))
    assert (ours <= published).all(), (ours, published)


def test_greedy_port_reproduces_published_example():
    phy2log, logcnt = greedy_rebalance(EXAMPLE_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, EXAMPLE_PHY2LOG)
    assert torch.equal(logcnt, counts_of(EXAMPLE_PHY2LOG, 12))


@pytest.mark.parametrize("shape", HIER + GLOBAL)
@pytest.mark.parametrize("kind", ["zipf", "lognormal", "uniform"])
def test_never_worse_than_greedy(shape, kind):
    experts, slots, groups, nodes, gpus = shape
    w = loads(kind, 6 if experts >= 256 else 12, experts, seed=7 * experts + slots)
    ours = max_load(w, rebalance_experts(w, slots, groups, nodes, gpus)[0], gpus)
    theirs = max_load(w, greedy_rebalance(w, slots, groups, nodes, gpus)[0], gpus)
    assert (ours <= theirs * (1 + 1e-9)).all(), (ours / theirs).max()


@pytest.mark.parametrize("shape,kind,margin", [
    ((256, 288, 8, 4, 32), "zipf", 0.05),        # prefill, hierarchical
    ((256, 288, 8, 18, 144), "lognormal", 0.005),  # decode, global
    ((64, 80, 8, 2, 16), "lognormal", 0.01),
])
def test_beats_greedy_on_average(shape, kind, margin):
    experts, slots, groups, nodes, gpus = shape
    w = loads(kind, 8, experts, seed=3)
    phy2log, _, logcnt = rebalance_experts(w, slots, groups, nodes, gpus)
    g_phy2log, g_logcnt = greedy_rebalance(w, slots, groups, nodes, gpus)
    ours = balancedness(w, phy2log, logcnt, gpus).mean()
    theirs = balancedness(w, g_phy2log, g_logcnt, gpus).mean()
    assert ours < theirs - margin, (ours, theirs)


def test_deterministic_and_thread_setting_restored():
    w = loads("zipf", 4, 64, seed=5)
    threads = torch.get_num_threads()
    first = rebalance_experts(w, 80, 8, 2, 16)
    assert torch.get_num_threads() == threads
    second = rebalance_experts(w.clone(), 80, 8, 2, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gpu_loads_and_balancedness_by_hand():
    w = torch.tensor([[9.0, 3.0], [8.0, 2.0], [0.0, 0.0]])
    phy2log = torch.tensor([[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1]])
    logcnt = torch.tensor([[3, 1], [2, 2], [2, 2]])
    load = gpu_loads(w, phy2log, logcnt, 2)
    assert load.tolist() == [[6.0, 6.0], [5.0, 5.0], [0.0, 0.0]]
    assert gpu_loads(w, phy2log, logcnt, 4).tolist() == [[3, 3, 3, 3], [4, 1, 4, 1], [0] * 4]
    assert balancedness(w, phy2log, logcnt, 4).tolist() == [1.0, 1.6, 1.0]
    with pytest.raises(ValueError, match="num_gpus=3"):
        gpu_loads(w, phy2log, logcnt, 3)


W12 = EXAMPLE_WEIGHT  # [2, 12]


@pytest.mark.parametrize("weight,args,needle", [
    (W12, (15, 4, 2, 8), "num_replicas=15"),
    (W12, (16, 4, 3, 8), "num_gpus=8 is not a multiple of num_nodes=3"),
    (W12, (16, 5, 1, 8), "num_groups=5"),
    (W12, (8, 4, 2, 8), "num_replicas=8"),
    (W12, (16, 4, 2, 0), "num_gpus must be a positive int, got 0"),
    (W12, (16.0, 4, 2, 8), "got 16.0"),
    (W12, (16, True, 2, 8), "num_groups must be a positive int, got True"),
    (W12, (-16, 4, 2, 8), "got -16"),
    (W12[0], (16, 4, 2, 8), "(12,)"),
    (W12[None], (16, 4, 2, 8), "(1, 2, 12)"),
    (W12[:0], (16, 4, 2, 8), "(0, 12)"),
    (W12.tolist(), (16, 4, 2, 8), "got list"),
    (W12 > 50, (16, 4, 2, 8), "torch.bool"),
    (torch.where(W12 == 61, -1, W12), (16, 4, 2, 8), "weight[0, 3] = -1.0"),
    (torch.where(W12 == 16, float("nan"), W12.double()), (16, 4, 2, 8), "weight[1, 10] = nan"),
    (torch.where(W12 == 4, float("inf"), W12.double()), (16, 4, 2, 8), "weight[0, 7] = inf"),
])
def test_bad_arguments(weight, args, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        rebalance_experts(weight, *args)
