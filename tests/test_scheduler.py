"""Scheduler and block manager driven through the engine with fake model outputs: no torch, no model."""
import subprocess
import sys
from collections import defaultdict

import pytest

from rayinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from rayinfer.engine.block_manager import BlockManager
from rayinfer.engine.engine import Engine
from rayinfer.engine.sequence import Sequence
from rayinfer.messages import EngineRequest, SamplingParams

from fake_runner import FakeKV, FakeRunner

BS = 64


def make_engine(num_blocks=64, max_num_seqs=8, budget=256, prefix=True, mode="mixed"):
    cfg = EngineConfig("fake", cache=CacheConfig(enable_prefix_caching=prefix),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, mode=mode))
    runner = FakeRunner(num_blocks)
    return Engine(cfg, runner=runner), runner


def run_all(engine, reqs, kv=None):
    for r in reqs:
        engine.add_request(r, (kv or {}).get(r.request_id))
    out = defaultdict(list)
    finish = {}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.token_ids
            if d.finish_reason:
                finish[d.request_id] = d
    return out, finish


def req(rid, n, max_tokens=8, start=10):
    return EngineRequest(rid, [start + (i * 13) % 80 for i in range(n)], SamplingParams(max_tokens=max_tokens,
                                                                                      ignore_eos=True))


def test_engine_imports_no_torch():
    code = "import sys, rayinfer.engine.engine; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_chunked_prefill_respects_budget_and_decodes_ride_along():
    engine, runner = make_engine(budget=100)
    out, fin = run_all(engine, [req("a", 250, 4), req("b", 30, 4)])
    assert all(sum(n for _, _, n in step) <= 100 for step in runner.steps)
    a_chunks = [(start, n) for step in runner.steps for rid, start, n in step if rid == "a" and start < 250]
    assert a_chunks == [(0, 100), (100, 100), (200, 50)]
    # b is admitted in the first step it fits and decodes while a is still prefilling
    b_steps = [i for i, step in enumerate(runner.steps) if any(r == "b" for r, _, _ in step)]
    a_last_prefill = max(i for i, step in enumerate(runner.steps) for r, s, n in step if r == "a" and s < 250)
    assert b_steps[0] <= a_last_prefill and len(out["a"]) == len(out["b"]) == 4
    assert fin["a"].finish_reason == "length" and engine.block_manager.num_allocated_blocks() == 0


def test_max_num_seqs_limits_running():
    engine, runner = make_engine(max_num_seqs=2)
    run_all(engine, [req(str(i), 10, 3) for i in range(5)])
    assert max(len(step) for step in runner.steps) <= 2


def test_preemption_recomputes_and_keeps_outputs_identical():
    # 8 sequences of 100 prompt + 60 output tokens need 3 pages each; 10 pages force preemption.
    reqs = [req(str(i), 100, 60, start=10 + i) for i in range(8)]
    big, _ = make_engine(num_blocks=64)
    want, _ = run_all(big, reqs)
    small, runner = make_engine(num_blocks=10)
    got, fin = run_all(small, reqs)
    assert small.scheduler.num_preemptions > 0
    assert got == want
    assert small.block_manager.num_allocated_blocks() == 0 and small.block_manager.num_free_blocks == 10
    # a preempted sequence was recomputed from position 0 (prompt + its generated tokens)
    recomputed = [(rid, start, n) for step in runner.steps for rid, start, n in step if start == 0 and n > 100]
    assert recomputed


def test_prefix_hits_reuse_pages_and_count_cached_tokens():
    engine, runner = make_engine()
    first, f1 = run_all(engine, [req("a", 300, 5)])
    second, f2 = run_all(engine, [req("b", 300, 5)])
    assert f1["a"].num_cached_tokens == 0 and f2["b"].num_cached_tokens == 256
    assert first["a"] == second["b"]
    b_prefill = [(s, n) for step in runner.steps for r, s, n in step if r == "b"][0]
    assert b_prefill == (256, 44)


def test_full_prompt_hit_still_computes_last_token():
    engine, runner = make_engine()
    run_all(engine, [req("a", 128, 2)])
    _, fin = run_all(engine, [req("b", 128, 2)])
    assert fin["b"].num_cached_tokens == 64  # the block holding the last prompt token is recomputed


def test_lru_eviction_prefers_least_recently_freed():
    bm = BlockManager(4, BS)
    seqs = []
    for i in range(2):
        s = Sequence(str(i), [i + 5] * 129, SamplingParams())
        bm.append(s, 128)
        s.num_computed_tokens = 128
        bm.commit(s)
        seqs.append(s)
    bm.release(seqs[0])
    bm.release(seqs[1])
    assert len(bm.cached) == 4
    # a new 2-page sequence evicts sequence 0's pages (freed first), tail page first
    s = Sequence("n", [99] * 100, SamplingParams())
    bm.append(s, 100)
    assert set(s.block_ids) == {0, 1} and len(bm.cached) == 2
    again = Sequence("r", [6] * 129, SamplingParams())
    assert bm.match_prefix(again) == 128


def test_abort_frees_pages_and_reports():
    engine, _ = make_engine()
    engine.add_request(req("a", 200, 50))
    engine.add_request(req("b", 50, 50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_allocated_blocks() > 0
    d = engine.abort("a")
    assert d.finish_reason == "abort" and engine.abort("missing") is None
    engine.abort("b")
    assert engine.block_manager.num_allocated_blocks() == 0 and not engine.has_unfinished()


def test_request_errors_are_clear():
    engine, _ = make_engine(num_blocks=2)
    with pytest.raises(ValueError, match="needs 208 tokens of KV cache"):
        engine.add_request(req("big", 200, 8))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(EngineRequest("v", [5, 100000], SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(EngineRequest("e", [], SamplingParams()))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request(EngineRequest("s", [5], SamplingParams(stop="x")))
    engine.add_request(req("dup", 5))
    with pytest.raises(ValueError, match="already running"):
        engine.add_request(req("dup", 5))


def test_stop_token_ids_and_eos():
    engine, _ = make_engine()
    probe, _ = run_all(engine, [req("p", 20, 10)])
    stop_at = probe["p"][3]
    r = EngineRequest("s", req("x", 20).prompt_token_ids, SamplingParams(max_tokens=10, stop_token_ids=[stop_at]))
    out, fin = run_all(engine, [r])
    assert out["s"] == probe["p"][:4] and fin["s"].finish_reason == "stop"


def handed_off(rid, n, max_tokens, start=10):
    """A request as a decode rank gets it: the prompt, plus the first token the prefill rank sampled."""
    r = req(rid, n, max_tokens, start)
    first = (r.prompt_token_ids[-1] * 7 + n) % 97 + 3  # what FakeRunner samples after the prompt
    return EngineRequest(rid, r.prompt_token_ids, r.params, output_token_ids=[first])


def test_arrived_with_kv_holds_no_pages_until_admitted_and_skips_its_prefill():
    engine, runner = make_engine(mode="decode")
    engine.add_request(handed_off("a", 150, 5), FakeKV(150))
    assert engine.block_manager.num_allocated_blocks() == 0 and not runner.imported
    out, fin = run_all(engine, [])
    assert runner.imported == [("a", 150, runner.imported[0][2])] and len(runner.imported[0][2]) == 3
    assert runner.steps[0] == [("a", 150, 1)]  # only the first output token is computed here
    assert engine.counters["kv_imported_tokens"] == 150 and engine.counters["prefill_tokens_computed"] == 0
    want, _ = run_all(make_engine()[0], [req("a", 150, 5)])
    assert out["a"] == want["a"][1:] and fin["a"].finish_reason == "length"
    assert engine.block_manager.num_allocated_blocks() == 0


def test_failed_transfer_at_the_head_and_kv_behind_it_both_decode():
    """The issue's livelock: 4 pages; B lost its KV (200-token prompt, recomputed here) and waits first;
    A arrived with KV for 150 tokens (3 pages). Neither may hold pages the other needs while waiting."""
    engine, runner = make_engine(num_blocks=4, mode="decode")
    b, a = handed_off("B", 200, 40, start=11), handed_off("A", 150, 20, start=12)
    engine.add_request(b)
    engine.add_request(a, FakeKV(150))
    out = {"A": list(a.output_token_ids), "B": list(b.output_token_ids)}
    fin = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        deltas = engine.step()
        assert runner.steps[-1], "a step with waiting work scheduled nothing"
        for d in deltas:
            out[d.request_id] += d.token_ids
            fin[d.request_id] = d.finish_reason
    assert fin == {"A": "length", "B": "length"} and len(out["A"]) == 20 and len(out["B"]) == 40
    mixed, _ = run_all(make_engine()[0], [req("A", 150, 20, start=12), req("B", 200, 40, start=11)])
    assert out["A"] == mixed["A"] and out["B"] == mixed["B"]
    assert [rid for rid, _, _ in runner.imported] == ["A"] and engine.block_manager.num_allocated_blocks() == 0


def test_preempted_kv_request_is_recomputed_and_abort_drops_a_waiting_payload():
    engine, runner = make_engine(num_blocks=3, mode="decode")
    engine.add_request(handed_off("a", 100, 60), FakeKV(100))  # 2 pages now, 3 by the end
    engine.add_request(handed_off("w", 100, 5), FakeKV(100))
    engine.step()
    assert engine.seqs["w"].pending_kv is not None and not engine.seqs["w"].block_ids  # no room: waits, no pages
    engine.abort("w")
    assert [rid for rid, _, _ in runner.imported] == ["a"]
    engine.add_request(req("c", 60, 60))  # needs pages a wants: a or c is preempted and recomputed
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.num_allocated_blocks() == 0
    assert [rid for rid, _, _ in runner.imported] == ["a"]  # a preempted request recomputes; it never re-imports


def test_abort_drops_an_uncollected_handoff():
    engine, runner = make_engine(mode="prefill")
    engine.add_request(req("p", 70, 8))
    deltas = engine.step()
    assert deltas[0].finish_reason == "handoff" and "p" in engine.exports
    assert engine.abort("p") is None and not engine.exports  # the request is done here; its export is not
