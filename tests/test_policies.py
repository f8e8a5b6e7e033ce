"""Tests for rayinfer.balance.policies and .tracker: each criterion picks the obviously lighter
rank, capacity is respected, picks are deterministic, the tracker counts its own routes until a
report covers them, and on skewed, bursty simulated workloads (benchmarks/balancers.py, with
stale stats) our policies leave less imbalance than round-robin and power-of-two-choices."""

import importlib.util
import random
from pathlib import Path

import pytest

from rayinfer.balance.policies import (LoadTracker, RankLoad, RequestCost, pick_decode_rank,
                                       pick_prefill_rank, power_of_two, round_robin)


def _load_bench():
    # The simulator lives with the benchmark so the library stays free of it.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "balancers.py"
    spec = importlib.util.spec_from_file_location("balancers_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
KV = dict(kv_capacity_tokens=100_000, max_num_seqs=64)


# ---- costs and loads ---------------------------------------------------------------------

@pytest.mark.parametrize("prompt,cached", [(1, 0), (100, 0), (100, 37), (4096, 4095), (5, 5)])
def test_attention_work_is_the_sum_over_new_positions(prompt, cached):
    cost = RequestCost(prompt, cached)
    brute = sum(cached + i for i in range(1, prompt - cached + 1))
    assert cost.uncached == prompt - cached
    assert cost.attention_work == pytest.approx(brute)


def test_kv_tokens_reserve_prompt_and_output_budget():
    assert RequestCost(1000, 400, max_tokens=256).kv_tokens == 1256


@pytest.mark.parametrize("kwargs,word", [(dict(prompt_tokens=-1), "prompt_tokens=-1"),
                                         (dict(prompt_tokens=10, cached_tokens=11), "11"),
                                         (dict(prompt_tokens=10, max_tokens=-3), "max_tokens=-3")])
def test_bad_costs_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RequestCost(**kwargs)


def test_bad_loads_and_empty_rank_lists_are_named():
    with pytest.raises(ValueError, match="kv_capacity_tokens.*0"):
        RankLoad(kv_capacity_tokens=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        RankLoad(max_num_seqs=0)
    cost = RequestCost(10)
    for pick in (pick_prefill_rank, pick_decode_rank):
        with pytest.raises(ValueError, match="empty"):
            pick([], cost)
    with pytest.raises(ValueError, match="empty"):
        LoadTracker("decode").pick([], cost, now=0.0)
    with pytest.raises(ValueError, match="'mixed'"):
        LoadTracker("mixed")


# ---- prefill ---------------------------------------------------------------------------

def test_prefill_picks_least_attention_then_least_tokens():
    cost = RequestCost(2000, 500)
    attn = [RankLoad(prefill_tokens=1000, attention_work=w) for w in (9e6, 2e6, 5e6)]
    assert pick_prefill_rank(attn, cost) == 1
    toks = [RankLoad(prefill_tokens=t, attention_work=4e6) for t in (3000, 5000, 800)]
    assert pick_prefill_rank(toks, cost) == 2


def test_prefill_weighs_both_axes_relative_to_their_means():
    # Rank 0 is 2x the mean on attention; rank 1 is 1.5x on tokens and average on attention.
    loads = [RankLoad(prefill_tokens=1000, attention_work=8e6),
             RankLoad(prefill_tokens=1500, attention_work=4e6),
             RankLoad(prefill_tokens=500, attention_work=0.0)]
    assert pick_prefill_rank(loads, RequestCost(1)) == 2
    assert pick_prefill_rank(loads[:2], RequestCost(1)) == 1


def test_ties_go_to_fewer_requests_then_lower_index():
    loads = [RankLoad(num_requests=3), RankLoad(num_requests=1), RankLoad(num_requests=1)]
    assert pick_prefill_rank(loads, RequestCost(100)) == 1
    idle = [RankLoad(**KV) for _ in range(4)]
    assert pick_decode_rank(idle, RequestCost(100)) == 0


# ---- decode ----------------------------------------------------------------------------

def test_decode_picks_least_kv_then_fewest_requests():
    cost = RequestCost(500, max_tokens=500)
    kv = [RankLoad(num_requests=10, kv_used_tokens=u, **KV) for u in (50_000, 20_000, 35_000)]
    assert pick_decode_rank(kv, cost) == 1
    reqs = [RankLoad(num_requests=n, kv_used_tokens=30_000, **KV) for n in (20, 30, 12)]
    assert pick_decode_rank(reqs, cost) == 2


def test_decode_compares_kv_as_a_fraction_of_each_ranks_capacity():
    loads = [RankLoad(kv_used_tokens=40_000, kv_capacity_tokens=50_000),
             RankLoad(kv_used_tokens=60_000, kv_capacity_tokens=200_000)]
    assert pick_decode_rank(loads, RequestCost(100)) == 1


def test_decode_avoids_ranks_that_cannot_fit():
    cost = RequestCost(4000, max_tokens=6000)  # needs 10k tokens of KV
    loads = [RankLoad(num_requests=2, kv_used_tokens=95_000, **KV),   # budget does not fit
             RankLoad(num_requests=64, kv_used_tokens=1_000, **KV),   # no sequence slot
             RankLoad(num_requests=40, kv_used_tokens=80_000, **KV)]  # fits, heavily loaded
    assert pick_decode_rank(loads, cost) == 2
    # Without a rank that fits the whole budget, one where the prompt fits now beats no room.
    assert pick_decode_rank(loads[:2], cost) == 0
    # All full: still answers, with the relatively lightest.
    full = [RankLoad(num_requests=64, kv_used_tokens=u, **KV) for u in (99_000, 90_000)]
    assert pick_decode_rank(full, cost) == 1


def test_picks_are_deterministic_and_follow_the_rank_not_its_position():
    rng = random.Random(7)
    loads = [RankLoad(num_requests=rng.randrange(60), prefill_tokens=rng.randrange(9000),
                      attention_work=rng.random() * 1e8, kv_used_tokens=rng.randrange(90_000),
                      **KV) for _ in range(16)]
    cost = RequestCost(3000, 1000, 700)
    for pick in (pick_prefill_rank, pick_decode_rank):
        chosen = loads[pick(loads, cost)]
        assert all(loads[pick(loads, cost)] is chosen for _ in range(3))
        shuffled = loads[:]
        random.Random(1).shuffle(shuffled)
        assert shuffled[pick(shuffled, cost)] is chosen


def test_baselines():
    loads = [RankLoad(num_requests=n) for n in (5, 0, 9, 2)]
    assert [round_robin(loads, RequestCost(1), t) for t in range(6)] == [0, 1, 2, 3, 0, 1]
    picks = [power_of_two(loads, RequestCost(1), random.Random(3)) for _ in range(2)]
    assert picks[0] == picks[1]  # seeded
    rng = random.Random(0)
    for _ in range(50):  # never the busiest of the pair, so never rank 2 (busiest of all)
        assert power_of_two(loads, RequestCost(1), rng) != 2
    assert power_of_two(loads[:1], RequestCost(1), rng) == 0


# ---- tracker ---------------------------------------------------------------------------

def test_tracker_adds_own_routes_until_a_newer_report_covers_them():
    t = LoadTracker("decode", grace_s=0.1)
    t.report("a", RankLoad(num_requests=3, kv_used_tokens=1000, **KV), taken_at=10.0)
    cost = RequestCost(200, max_tokens=100)
    t.routed("a", cost, at=10.5)
    t.routed("a", cost, at=10.95)
    eff = t.effective("a", now=11.0)
    assert (eff.num_requests, eff.kv_used_tokens) == (5, 1600)
    assert eff.kv_capacity_tokens == KV["kv_capacity_tokens"]
    # Taken at 11.0: the route at 10.5 is in it, the one within grace (10.95 > 10.9) may not be.
    t.report("a", RankLoad(num_requests=4, kv_used_tokens=1300, **KV), taken_at=11.0)
    assert t.effective("a", now=11.3).num_requests == 5
    t.report("a", RankLoad(num_requests=5, kv_used_tokens=1600, **KV), taken_at=12.0)
    assert t.effective("a", now=12.3).num_requests == 5
    # A report that was overtaken in transit by a newer one is ignored.
    t.report("a", RankLoad(num_requests=0, **KV), taken_at=11.5)
    assert t.effective("a", now=12.3).num_requests == 5


def test_tracker_prefill_counts_attention_and_finished_requests():
    t = LoadTracker("prefill")
    t.report("p", RankLoad(num_requests=1, prefill_tokens=500, attention_work=1e5), 0.0)
    big, small = RequestCost(3000, 1000), RequestCost(400)
    t.routed("p", big, at=0.5)
    eff = t.effective("p", now=0.6)
    assert eff.prefill_tokens == 2500
    assert eff.attention_work == pytest.approx(1e5 + big.attention_work)
    assert t.effective("p", now=0.4).num_requests == 1  # routes after `now` do not count yet
    t.finished("p", big, at=0.9)       # still an own route: stop counting it
    assert t.effective("p", now=1.0).prefill_tokens == 500
    t.finished("p", small, at=0.9)     # counted by the report (it was the queued one): subtract
    eff = t.effective("p", now=1.0)
    assert (eff.num_requests, eff.prefill_tokens) == (0, 100)
    t.report("p", RankLoad(), 1.0)     # the next report no longer counts it either
    assert t.effective("p", now=1.1) == RankLoad()


def test_tracker_treats_unreported_ranks_as_idle_and_full_size():
    t = LoadTracker("decode")
    t.report("old", RankLoad(num_requests=30, kv_used_tokens=60_000, **KV), 0.0)
    assert t.effective("new", now=0.5) == RankLoad(**KV)
    assert t.pick(["old", "new"], RequestCost(1000, max_tokens=1000), now=0.5) == "new"
    t.forget("old")
    assert t.effective("old", now=0.5) == RankLoad(**KV)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_stale_stats_and_a_burst_do_not_pile_onto_one_rank(kind):
    ids = [f"r{i}" for i in range(8)]
    t = LoadTracker(kind)
    for i, r in enumerate(ids):  # r3 looked lightest a second ago
        light = i == 3
        t.report(r, RankLoad(num_requests=2 if light else 6, prefill_tokens=500 if light else 4000,
                             attention_work=1e5 if light else 2e7,
                             kv_used_tokens=5_000 if light else 40_000, **KV), taken_at=0.0)
    cost = RequestCost(2000, max_tokens=500)
    stale = [t.effective(r, now=1.0) for r in ids]
    pick = pick_prefill_rank if kind == "prefill" else pick_decode_rank
    assert {pick(stale, cost) for _ in range(32)} == {3}  # what reports alone would do
    counts = dict.fromkeys(ids, 0)
    for _ in range(32):  # all within a millisecond, long before the next report
        r = t.pick(ids, cost, now=1.0)
        t.routed(r, cost, at=1.0)
        counts[r] += 1
    assert counts["r3"] > max(counts[r] for r in ids if r != "r3")  # it did look lightest
    assert max(counts.values()) <= 10 and min(counts.values()) >= 2


# ---- skewed workloads, simulated -----------------------------------------------------------

WORKLOADS = {wl.name: wl for wl in bench.WORKLOADS}
BASELINES = ("round-robin", "power-of-two")


@pytest.fixture(scope="module")
def sims():
    """Mean max/mean imbalance per (stage, workload, policy, metric); 8 ranks, 2000 requests."""
    out = {}
    for stage in ("prefill", "decode"):
        for name in ("lognormal", "pareto-bursty"):
            trace = bench.make_trace(WORKLOADS[name], stage, 2000, 8, seed=0)
            for policy in ("ours", "ours-stale") + BASELINES:
                for metric, samples in bench.simulate(trace, policy, 8, seed=0).items():
                    out[stage, name, policy, metric] = bench.summary(samples)[0]
    return out


@pytest.mark.parametrize("name", ["lognormal", "pareto-bursty"])
@pytest.mark.parametrize("metric", ["attn", "tokens"])
def test_prefill_imbalance_beats_baselines(sims, name, metric):
    ours = sims["prefill", name, "ours", metric]
    for base in BASELINES:
        assert ours < 0.95 * sims["prefill", name, base, metric], (base, sims)


@pytest.mark.parametrize("name", ["lognormal", "pareto-bursty"])
def test_decode_kv_imbalance_beats_baselines(sims, name):
    ours = sims["decode", name, "ours", "kv"]
    for base in BASELINES:
        assert ours < 0.9 * sims["decode", name, base, "kv"], (base, sims)


@pytest.mark.parametrize("name", ["lognormal", "pareto-bursty"])
def test_decode_request_counts_stay_balanced(sims, name):
    ours = sims["decode", name, "ours", "reqs"]
    assert ours <= sims["decode", name, "round-robin", "reqs"]
    # Power-of-two balances counts alone; ours gives a little of that up for KV balance.
    assert ours <= 1.1 * sims["decode", name, "power-of-two", "reqs"]
    if name == "lognormal":
        assert ours < sims["decode", name, "power-of-two", "reqs"]


@pytest.mark.parametrize("stage,metric", [("prefill", "tokens"), ("decode", "kv")])
def test_own_route_accounting_is_what_survives_bursts(sims, stage, metric):
    assert (sims[stage, "pareto-bursty", "ours", metric]
            < 0.8 * sims[stage, "pareto-bursty", "ours-stale", metric])


def test_prefill_prefers_the_rank_holding_the_longest_prefix_unless_it_is_much_busier():
    idle = [RankLoad(), RankLoad(), RankLoad()]
    cost = RequestCost(prompt_tokens=2000)
    assert pick_prefill_rank(idle, cost, device_hits=[0, 1920, 640]) == 1
    assert pick_prefill_rank(idle, cost, device_hits=[0, 640, 1920]) == 2
    busy = [RankLoad(), RankLoad(prefill_tokens=20000, attention_work=2e8, num_requests=10), RankLoad()]
    assert pick_prefill_rank(busy, cost, device_hits=[0, 1920, 0]) == 0  # a hit does not outweigh a full queue
    # Loading from disk is cheap work, not free: an equally idle rank holding it on the device wins...
    assert pick_prefill_rank(idle, cost, device_hits=[0, 0, 1920], disk_hit=1920) == 2
    # ...and stays preferred over a little queued work, less than the load would cost;
    loads = [RankLoad(prefill_tokens=100, attention_work=5000.0), RankLoad(), RankLoad(prefill_tokens=100)]
    assert pick_prefill_rank(loads, cost, device_hits=[1920, 0, 0], disk_hit=1920) == 0
    # but with a prompt's worth queued there, an idle rank loading from disk is cheaper; without the
    # disk tier that idle rank would compute all 2,000 tokens, and the busy holder is still the better pick.
    loads[0] = RankLoad(prefill_tokens=2000, attention_work=5000.0)
    assert pick_prefill_rank(loads, cost, device_hits=[1920, 0, 0], disk_hit=1920) == 1
    assert pick_prefill_rank(loads, cost, device_hits=[1920, 0, 0], disk_hit=0) == 0


def test_a_rank_holding_the_prefix_keeps_it_within_a_slack_smaller_when_the_disk_has_it():
    from rayinfer.balance.policies import AFFINITY_SLACK_TOKENS, DISK_LOAD_COST, prefer_prefix_holder

    loads = [RankLoad(prefill_tokens=1500), RankLoad()]
    assert prefer_prefix_holder(loads, 1, [1920, 0]) == 0  # 1,500 queued < one chunk: the certain hit wins
    assert prefer_prefix_holder(loads, 1, [1920, 0], disk_hit=1920) == 1  # rank 1 loads it for a tenth
    assert prefer_prefix_holder(loads, 1, [0, 0]) == 1 and prefer_prefix_holder(loads, 1, [640, 640]) == 1
    loads[0] = RankLoad(prefill_tokens=AFFINITY_SLACK_TOKENS + 1)
    assert prefer_prefix_holder(loads, 1, [1920, 0]) == 1
    loads[0] = RankLoad(prefill_tokens=int(AFFINITY_SLACK_TOKENS * DISK_LOAD_COST))
    assert prefer_prefix_holder(loads, 1, [1920, 0], disk_hit=1920) == 0


def test_prefix_index_remembers_where_pages_went_and_forgets_the_oldest():
    from rayinfer.balance.prefix_index import PrefixIndex, page_keys

    a = page_keys(list(range(700)))  # 10 full pages, the one with the last token excluded
    b = page_keys(list(range(300)) + [999] * 200)
    assert len(a) == 10 and a[:4] == b[:4] and a[4] != b[4] and page_keys([1] * 64) == []
    idx = PrefixIndex(max_pages=11)
    idx.record(a, "r0")
    idx.record(b[:6], "r1")
    assert idx.device_tokens(b, ["r0", "r1", "r2"]) == [256, 384, 0]
    assert idx.seen_tokens(b) == 384
    # 12 pages over a budget of 11: the least recently recorded goes (a's 5th: b refreshed the first 4)
    assert len(idx.pages) == 11 and idx.seen_tokens(a) == 256 and idx.device_tokens(a, ["r0"]) == [256]
    idx.forget("r1")
    assert idx.device_tokens(b, ["r1"]) == [0] and idx.device_tokens(b, ["r0"]) == [256]
