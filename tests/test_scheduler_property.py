"""Seeded random workloads against the scheduler + block manager (fake runner, no model), with the cache's
invariants checked after every operation: the kind of test that finds admission livelocks and page leaks."""
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from rayinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from rayinfer.engine.block_manager import block_hash
from rayinfer.engine.engine import Engine
from rayinfer.engine.sequence import Accepted
from rayinfer.messages import EngineRequest, SamplingParams

from fake_runner import FakeKV, FakeRunner

BS = 64
NUM_BLOCKS, BUDGET, MAX_SEQS = 12, 160, 6


def next_token(tokens: list[int]) -> int:
    return (tokens[-1] * 7 + len(tokens)) % 97 + 3  # what FakeRunner samples


def chain_hash(tokens: list[int]) -> bytes:
    h = b""
    for i in range(0, len(tokens), BS):
        h = block_hash(h, tokens[i:i + BS])
    return h


class PageWritingRunner(FakeRunner):
    """Also writes each computed (or imported) token into a shadow of the paged cache, and records the
    chained hash of every page it fills, so the test can check what each page really holds."""

    def __init__(self, num_blocks):
        super().__init__(num_blocks)
        self.pages = [[None] * BS for _ in range(num_blocks)]
        self.filled_hash: dict[int, bytes] = {}

    def _write(self, seq, start, n, drafts=()):
        tokens = seq.token_ids[:start + n] + list(drafts)  # drafts: written like tokens, verified or not
        for pos in range(start, start + n + len(drafts)):
            page = seq.block_ids[pos // BS]
            self.pages[page][pos % BS] = tokens[pos]
            if pos % BS == BS - 1:
                self.filled_hash[page] = chain_hash(tokens[:pos + 1])

    def import_kv(self, seq, latents):
        super().import_kv(seq, latents)
        self._write(seq, 0, latents.shape[1])

    def execute(self, sched):
        for s in sched.scheduled:
            self._write(s.seq, s.start, s.num_new_tokens)
        return super().execute(sched)


class SpeculatingRunner(PageWritingRunner):
    """Drafts for every sequence the scheduler gave draft slots: the true next tokens for a seeded number of them,
    then wrong ones (written into the pages all the same); verification accepts the true ones."""

    num_speculative_tokens = 3

    def __init__(self, num_blocks, seed):
        super().__init__(num_blocks)
        self.rng = random.Random(seed)
        self.drafted = self.accepted = 0

    def execute(self, sched):
        self.steps.append([(s.seq.request_id, s.start, s.num_new_tokens + s.num_draft_tokens) for s in sched.scheduled])
        out = {}
        for s in sched.scheduled:
            seq, d = s.seq, s.num_draft_tokens
            run = [next_token(seq.token_ids)]
            for _ in range(d):
                run.append(next_token(seq.token_ids + run))
            a = self.rng.randrange(d + 1) if d else 0
            drafts = run[:a] + [0] * (d - a)  # token 0 is never the true next token
            self._write(seq, s.start, s.num_new_tokens, drafts)
            if d:
                out[seq.request_id] = Accepted(run[:a + 1], [None] * (a + 1), d, a)
                self.drafted, self.accepted = self.drafted + d, self.accepted + a
            elif s.samples:
                out[seq.request_id] = (run[0], None)
            seq.draft_state = SimpleNamespace(end=s.start + (1 + a if d else s.num_new_tokens))
        return out


def check_invariants(engine: Engine, runner: PageWritingRunner) -> None:
    bm, sched = engine.block_manager, engine.scheduler
    live = [*sched.running, *sched.waiting]
    refs = Counter(b for s in live for b in s.block_ids)
    assert all(bm.ref_counts[b] == refs[b] for b in range(bm.num_blocks)), (bm.ref_counts, refs)
    free = bm.free_block_ids()
    assert set(free) == {b for b in range(bm.num_blocks) if bm.ref_counts[b] == 0}
    assert len(free) == len(set(free)) == bm.num_free_blocks
    for h, b in bm.cached.items():
        assert bm.hashes[b] == h and runner.filled_hash.get(b) == h, f"page {b} does not hold its hash"
    assert sum(h is not None for h in bm.hashes) == len(bm.cached)
    assert all(not s.block_ids and s.num_computed_tokens == 0 for s in sched.waiting), "a waiting request holds pages"
    assert len(sched.running) <= MAX_SEQS
    for s in sched.running:  # no pages past its tokens (rejected drafts' went back)
        assert len(s.block_ids) <= bm.blocks_needed(s.num_tokens), s
    for s in sched.running:  # every computed token sits in the sequence's own page
        for i in range(0, s.num_computed_tokens, BS):
            n = min(BS, s.num_computed_tokens - i)
            assert runner.pages[s.block_ids[i // BS]][:n] == s.token_ids[i:i + n], (s, i)


def random_prompt(rng: random.Random, prefixes: list[list[int]]) -> list[int]:
    head = rng.choice(prefixes)[:rng.randrange(0, 3 * BS)] if rng.random() < 0.6 else []
    return head + [rng.randrange(3, 100) for _ in range(rng.randrange(1, 200))]


def run_workload(seed: int, num_ops: int = 2000, speculate: bool = False) -> dict:
    rng = random.Random(seed)
    cfg = EngineConfig("fake", cache=CacheConfig(enable_prefix_caching=True),
                       scheduler=SchedulerConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, mode="decode"))
    runner = SpeculatingRunner(NUM_BLOCKS, seed) if speculate else PageWritingRunner(NUM_BLOCKS)
    engine = Engine(cfg, runner=runner)
    prefixes = [[rng.randrange(3, 100) for _ in range(3 * BS)] for _ in range(3)]
    requests, outputs, finished, aborted, rejected = {}, {}, {}, set(), 0
    for op in range(num_ops):
        r = rng.random()
        if r < 0.25:
            rid, prompt = f"r{op}", random_prompt(rng, prefixes)
            params = SamplingParams(max_tokens=rng.randrange(1, 80), ignore_eos=True)
            kv, first = None, []
            if rng.random() < 0.5 and params.max_tokens > 1:  # handed off by a prefill rank, KV arriving or not
                first = [next_token(prompt)]
                kv = FakeKV(len(prompt)) if rng.random() < 0.7 else None
            try:
                engine.add_request(EngineRequest(rid, prompt, params, output_token_ids=first), kv)
            except ValueError as e:  # more than the whole cache: refused up front, never admitted
                assert "needs" in str(e) and len(prompt) + params.max_tokens > NUM_BLOCKS * BS
                rejected += 1
                continue
            requests[rid], outputs[rid] = (prompt, params.max_tokens), list(first)
        elif r < 0.32 and engine.seqs:
            rid = rng.choice(sorted(engine.seqs))
            engine.abort(rid)
            aborted.add(rid)
        else:
            had_work = engine.has_unfinished()
            for d in engine.step():
                outputs[d.request_id] += d.token_ids
                if d.finish_reason:
                    finished[d.request_id] = d.finish_reason
            if had_work:  # progress: some request was admissible, so something ran
                assert runner.steps[-1], f"seed {seed} op {op}: no progress with {engine.scheduler.waiting}"
                assert sum(n for _, _, n in runner.steps[-1]) <= BUDGET
        check_invariants(engine, runner)
    while engine.has_unfinished():
        for d in engine.step():
            outputs[d.request_id] += d.token_ids
            if d.finish_reason:
                finished[d.request_id] = d.finish_reason
        check_invariants(engine, runner)
    assert engine.block_manager.num_allocated_blocks() == 0 and not engine.seqs and not engine.exports
    for rid, (prompt, max_tokens) in requests.items():
        tokens = list(prompt)
        for t in outputs[rid]:  # preemption, prefix hits and imports never change what is generated
            assert t == next_token(tokens), rid
            tokens.append(t)
        if rid not in aborted:
            assert finished[rid] == "length" and len(outputs[rid]) == max_tokens, rid
    return dict(preemptions=engine.scheduler.num_preemptions, imports=len(runner.imported),
                prefix_hits=engine.block_manager.hits, finished=len(finished), aborted=len(aborted), rejected=rejected,
                drafted=getattr(runner, "drafted", 0), accepted=getattr(runner, "accepted", 0))


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_keep_the_cache_consistent_and_always_progress(seed):
    seen = run_workload(seed)
    # The workload exercised what it is meant to: pressure, imports, shared prefixes, aborts.
    assert seen["preemptions"] > 0 and seen["imports"] > 0 and seen["prefix_hits"] > 0, seen
    assert seen["finished"] > 50 and seen["aborted"] > 0, seen


@pytest.mark.parametrize("seed", range(3))
def test_speculative_workloads_keep_the_cache_consistent(seed):
    """Draft slots in the budget and the pages, rejected drafts rolled back, only verified tokens hashed, max_tokens
    met exactly: the same invariants and the same outputs with speculative steps."""
    seen = run_workload(seed, speculate=True)
    assert seen["preemptions"] > 0 and seen["imports"] > 0 and seen["prefix_hits"] > 0, seen
    assert 0 < seen["accepted"] < seen["drafted"] and seen["finished"] > 50, seen
