"""Decode steps padded to batch-size buckets (what CUDA graphs would replay), run on CPU with graphs off."""
from __future__ import annotations

import pytest

from rayinfer import LLM, SamplingParams
from rayinfer.engine.decode_buckets import bucket_for, bucket_sizes, is_decode_step


def test_bucket_sizes_cover_every_batch_with_the_smallest_bucket():
    assert bucket_sizes(1) == [1] and bucket_sizes(2) == [1, 2] and bucket_sizes(5) == [1, 2, 4, 8]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    sizes = bucket_sizes(70)
    assert sizes[-1] == 72
    for n in range(1, 71):
        b = bucket_for(n, sizes)
        assert b >= n and all(s < n for s in sizes if s < b)
    with pytest.raises(ValueError, match="73 decode sequences"):
        bucket_for(73, sizes)
    with pytest.raises(ValueError, match="got 0"):
        bucket_sizes(0)


def test_only_pure_decode_steps_pad():
    assert is_decode_step([(None, 7, 1), (None, 3, 1)])
    assert not is_decode_step([(None, 7, 1), (None, 0, 5)]) and not is_decode_step([(None, 0, 1)])
    assert not is_decode_step([])


def test_padded_decode_gives_the_same_tokens_and_spares_real_pages():
    prompts = [[5 + i, 9, 11 + 2 * i, 40, 7 * i + 3][: 3 + i % 3] for i in range(5)]  # 5 sequences -> bucket 8
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    plain = LLM("tiny", max_num_seqs=8)
    want = [o.token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]

    padded = LLM("tiny", max_num_seqs=8)
    runner = padded.engine.runner
    runner.decode_buckets = bucket_sizes(8)  # what a CUDA runner sets; graphs stay off here
    sizes, prepare = [], runner.prepare
    runner.prepare = lambda items: sizes.append(len(items)) or prepare(items)
    got = [o.token_ids for o in padded.generate(prompts, sp, use_tqdm=False)]
    assert got == want
    assert 8 in sizes and max(sizes) == 8, sizes  # decode steps ran padded to their bucket
    assert runner.scratch_page == runner.num_blocks == padded.engine.block_manager.num_blocks
    assert runner.kv_caches[0].shape[0] == runner.num_blocks + 1
