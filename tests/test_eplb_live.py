"""Live expert rebalancing: the load window, weight moves, and a rebalance on a running 4-rank gang."""
import threading
import time

import pytest
import torch

from rayinfer import LLM, SamplingParams
from rayinfer.balance.placement import ExpertPlacement
from rayinfer.engine.ep import ExpertLoadWindow
from rayinfer.engine.eplb_live import LiveRebalancer, imbalance, move_experts
from rayinfer.model import load_model, resolve_model_path


def test_load_window_slides():
    w = ExpertLoadWindow(num_layers=1, num_logical=4, window=2)
    for step in ([0, 0, 1], [2], [3, 3, 3]):
        w.add(0, torch.tensor(step))
        w.end_step()
    assert w.sum[0].tolist() == [0, 0, 1, 3]  # the first step fell out of the 2-step window
    assert w.total[0].tolist() == [2, 1, 1, 3]
    w.clear()
    assert int(w.sum.sum()) == 0 and int(w.total.sum()) == 7


def test_move_experts_fills_new_slots_from_local_copies_and_checkpoint():
    full = load_model("tiny", mtp=True)  # the MTP layer's experts move too
    layers = full.cfg.moe_layers + [full.cfg.num_hidden_layers]
    old = ExpertPlacement.initial(layers, 16, 4, ep_size=4)  # rank 1 holds experts 5..9
    shard = load_model("tiny", local_experts=old.local_experts(1), mtp=True)
    row = torch.arange(20) % 16
    row[5:10] = torch.tensor([9, 2, 2, 5, 15])  # rank 1: a local move, a new expert twice, a kept one, a new one
    row[16:19] = torch.tensor([6, 7, 8])  # (every expert keeps a replica somewhere)
    new = ExpertPlacement.from_phy2log(layers, row.repeat(len(layers), 1), 16, 4)
    changed, local, ckpt = move_experts(shard, new, 1, resolve_model_path("tiny"))
    assert ckpt == 2 * len(layers) and local == 2 * len(layers)  # 2 and 15 from disk; 9 and 5 moved locally
    for moe, ref in zip(shard.moe_layers, full.moe_layers):
        assert moe.experts.logical_ids == [9, 2, 2, 5, 15]
        for s, e in enumerate(moe.experts.logical_ids):
            assert torch.equal(moe.experts.w13[s], ref.experts.w13[e]) and torch.equal(moe.experts.w2[s], ref.experts.w2[e])


def test_periodic_rebalance_is_asked_for_by_rank_0_only():
    class Ctx:
        received_tokens = 7

    class Runner:
        ctx = Ctx()

    class Eng:
        runner = Runner()

    r0 = LiveRebalancer(Eng(), None, rank=0, interval_s=0.05)
    r1 = LiveRebalancer(Eng(), None, rank=1, interval_s=0.05)
    assert r0.vote_extras() == (False, 7.0)
    time.sleep(0.06)
    assert r0.vote_extras()[0] and not r1.vote_extras()[0]
    r1.requested = True
    assert r1.vote_extras()[0]
    assert imbalance([1, 1, 4]) == 2.0 and imbalance([0, 0]) == 1.0


PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)


def _skewed_prompts():
    g = torch.Generator().manual_seed(3)  # few distinct tokens: routing piles onto a few experts
    return [torch.randint(100, 104, (int(n),), generator=g).tolist() for n in torch.randint(20, 80, (24,), generator=g)]


def test_live_rebalance_on_a_gang_lowers_imbalance_and_keeps_outputs(ray_cluster):
    prompts = _skewed_prompts()
    reference = LLM("tiny").generate(prompts, PARAMS, use_tqdm=False)
    llm = LLM("tiny", ep_size=4, num_redundant_experts=4)
    try:
        before = llm.generate(prompts, PARAMS, use_tqdm=False)
        loads_before = [s["expert_recv_window"] for s in llm.stats()]
        record = llm.rebalance()
        after = llm.generate(prompts, PARAMS, use_tqdm=False)
        loads_after = [s["expert_recv_window"] for s in llm.stats()]
        print(f"\n[eplb] receive load per rank before {loads_before} (max/mean {imbalance(loads_before):.3f}), "
              f"after {loads_after} (max/mean {imbalance(loads_after):.3f}); moved: {record}")
        assert record["slots_changed"] > 0 and abs(record["imbalance_before"] - imbalance(loads_before)) < 1e-6
        assert imbalance(loads_after) < imbalance(loads_before) and imbalance(loads_after) < 1.15
        for got in (before, after):
            assert [o.token_ids for o in got] == [r.token_ids for r in reference]
            worst = max(abs(a[t] - b[t]) for o, r in zip(got, reference)
                        for a, b, t in zip(o.logprobs, r.logprobs, o.token_ids))
            assert worst <= 1e-4

        # A rebalance while requests are in flight: they continue, none fails, nothing changes.
        long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
        want = LLM("tiny").generate(prompts[:8], long, use_tqdm=False)
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=llm.generate(prompts[:8], long, use_tqdm=False)))
        worker.start()
        time.sleep(1.0)
        mid = llm.rebalance()
        worker.join(timeout=120)
        assert "slots_changed" in mid and not worker.is_alive()
        assert [o.token_ids for o in result["out"]] == [w.token_ids for w in want]
        assert all(o.finish_reason == "length" for o in result["out"])
    finally:
        llm.shutdown()


def test_rebalance_needs_a_gang():
    with pytest.raises(ValueError, match="ep_size"):
        LLM("tiny").rebalance()


def test_a_layer_keeps_its_placement_unless_the_new_one_lowers_its_peak():
    from rayinfer.balance.eplb import max_gpu_load
    from rayinfer.engine.eplb_live import choose_placement

    old = ExpertPlacement.initial([1, 2], 16, 4, ep_size=4)
    load = torch.ones(2, 16)
    load[1, :3] = 50.0
    first = choose_placement(load, old, num_groups=1)
    assert (max_gpu_load(load, first, 4) < max_gpu_load(load, old.phy2log, 4)).all()
    settled = ExpertPlacement.from_phy2log([1, 2], first, 16, 4)
    assert torch.equal(choose_placement(load, settled, num_groups=1), first)  # nothing better: nothing moves
    shifted = load.clone()
    shifted[0, 5:8] = 40.0  # only layer 1's load changed
    again = choose_placement(shifted, settled, num_groups=1)
    assert not torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
