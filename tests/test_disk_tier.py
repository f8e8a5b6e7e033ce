"""The disk tier inside an engine (tiny preset, offline `LLM`): pages loaded from disk give the same
tokens as computing them, across engines sharing a directory, with bad files, while the rank keeps
stepping, and for pages that generated tokens complete (multi-turn reuse)."""
import os
import threading

import pytest

from rayinfer import LLM, SamplingParams
from rayinfer.messages import EngineRequest

PREFIX = [(i * 7) % 200 + 3 for i in range(300)]  # 4 full pages of shared prefix
PROMPTS = [PREFIX + [5, 6, 7 + i] for i in range(3)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, seed=7)


@pytest.fixture(scope="module")
def reference():
    llm = LLM("tiny")
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)], \
           [o.token_ids for o in llm.generate(PROMPTS, SAMPLED, use_tqdm=False)]


def _run(d, params=GREEDY, prompts=PROMPTS):
    llm = LLM("tiny", disk_cache_dir=str(d))
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    return outs, llm.stats()[0]


def test_pages_from_disk_give_the_same_tokens_as_computing_them(tmp_path, reference):
    greedy, sampled = reference
    first, s1 = _run(tmp_path)
    assert [o.token_ids for o in first] == greedy and s1["disk_hit_tokens"] == 0
    assert s1["disk_pages_written"] == 4 and s1["prefill_tokens_computed"] == 3 * len(PROMPTS[0])
    for params, want in ((GREEDY, greedy), (SAMPLED, sampled)):  # a fresh engine on the same directory
        outs, s = _run(tmp_path, params)
        assert [o.token_ids for o in outs] == want
        assert [o.num_cached_tokens for o in outs] == [256] * 3
        assert s["disk_hit_tokens"] >= 256 and s["disk_corrupt_pages"] == 0
        assert s["prefill_tokens_computed"] == 3 * (len(PROMPTS[0]) - 256)
        assert s["cached_tokens"] == 3 * 256


def test_corrupt_files_are_recomputed_counted_and_change_nothing(tmp_path, reference):
    _run(tmp_path)
    files = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    assert len(files) == 4
    for f in files:  # damage every page: one truncated, the others with a flipped payload byte
        data = bytearray(open(f, "rb").read())
        data[-7] ^= 0x40
        open(f, "wb").write(data if f != files[0] else data[:100])
    outs, s = _run(tmp_path)
    assert [o.token_ids for o in outs] == reference[0]
    assert s["disk_hit_tokens"] == 0 and s["disk_corrupt_pages"] >= 1  # the first page is bad: none is used
    # (a request whose load ends after another computed the prefix reuses it from the device: timing decides)
    assert s["prefill_tokens_computed"] + s["cached_tokens"] == 3 * len(PROMPTS[0])
    assert s["disk_pages_written"] >= 1  # the bad first page was removed and written again
    outs, s = _run(tmp_path)
    assert [o.token_ids for o in outs] == reference[0] and s["disk_hit_tokens"] >= 64


def test_a_request_waits_for_its_pages_while_the_rank_keeps_stepping(tmp_path, reference):
    _run(tmp_path)
    llm = LLM("tiny", disk_cache_dir=str(tmp_path))
    eng, gate = llm.engine, threading.Event()
    real = eng.disk.cache.read_prefix
    eng.disk.cache.read_prefix = lambda hs: (gate.wait(30), real(hs))[1]
    eng.add_request(EngineRequest("disk", PROMPTS[0], GREEDY))
    eng.add_request(EngineRequest("fresh", [9, 8, 7, 6], GREEDY))
    eng.add_request(EngineRequest("gone", PROMPTS[1], GREEDY))
    eng.abort("gone")  # aborted while loading: nothing of it is left
    done = {}
    while "fresh" not in done:
        for d in eng.step():
            done.setdefault(d.request_id, []).extend(d.token_ids)
    assert "disk" not in done and eng.stats()["disk_loading"] == 1 and eng.has_unfinished()
    gate.set()
    while eng.has_unfinished():
        for d in eng.step():
            done.setdefault(d.request_id, []).extend(d.token_ids)
    assert done["disk"] == reference[0][0] and "gone" not in done
    assert eng.stats()["disk_hit_tokens"] >= 256 and eng.block_manager.num_allocated_blocks() == 0


def test_pages_completed_by_generated_tokens_are_written_and_reused_next_turn(tmp_path):
    turn1 = PREFIX[:100]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    (out,), s = _run(tmp_path, params, [turn1])
    assert s["disk_pages_written"] == 2  # page 1 from the prompt, page 2 completed by generated tokens
    turn2 = out.prompt_token_ids + out.token_ids + [11, 12]
    fresh = LLM("tiny").generate([turn2], GREEDY, use_tqdm=False)[0]
    (again,), s = _run(tmp_path, GREEDY, [turn2])
    assert again.num_cached_tokens == 128 and again.token_ids == fresh.token_ids
