"""Scheduler and block manager driven through the engine with fake model outputs: no torch, no model."""
import subprocess
import sys

import pytest

from rayinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from rayinfer.engine.block_manager import BlockManager
from rayinfer.engine.engine import Engine
from rayinfer.engine.sequence import Sequence
from rayinfer.messages import EngineRequest, SamplingParams

BS = 64


class FakeRunner:
    """Samples token (last token * 7 + position) % 97 + 3: deterministic in the sequence's own tokens."""

    def __init__(self, num_blocks: int, max_model_len: int = 4096):
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self.vocab_size, self.eos_token_ids, self.checkpoint_path = 100, {1}, None
        self.steps = []

    def execute(self, sched):
        self.steps.append([(s.seq.request_id, s.start, s.num_new_tokens) for s in sched.scheduled])
        out = {}
        for s in sched.scheduled:
            if s.samples:
                seq = s.seq
                out[seq.request_id] = ((seq.token_ids[-1] * 7 + seq.num_tokens) % 97 + 3, None)
        return out


def make_engine(num_blocks=64, max_num_seqs=8, budget=256, prefix=True):
    cfg = EngineConfig("fake", cache=CacheConfig(enable_prefix_caching=prefix),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget))
    runner = FakeRunner(num_blocks)
    return Engine(cfg, runner=runner), runner


def run_all(engine, reqs):
    for r in reqs:
        engine.add_request(r)
    out = {r.request_id: [] for r in reqs}
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
