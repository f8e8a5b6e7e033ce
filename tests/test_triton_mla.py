"""The Triton split-KV paged MLA decode kernel against the reference, under Triton's CPU interpreter."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported: its @triton.jit reads it
pytest.importorskip("triton")

from rayinfer.kernels.mla import PAGE_SIZE, mla_decode  # noqa: E402
from rayinfer.kernels.triton_mla import mla_decode_triton, num_splits  # noqa: E402


def _paged(lens: list[int], h: int, d: int, seed: int):
    """Pages in a shuffled order; rows no sequence owns (page tails, spare pages) hold NaN."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // PAGE_SIZE) for n in lens]
    pages = sum(need) + 2
    cache = torch.full((pages, PAGE_SIZE, d), float("nan"), dtype=torch.bfloat16)
    order = torch.randperm(pages, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.long)
    start = 0
    for b, (n, k) in enumerate(zip(lens, need)):
        table[b, :k] = order[start:start + k]
        start += k
        for j in range(n):
            cache[table[b, j // PAGE_SIZE], j % PAGE_SIZE] = torch.randn(d, generator=g)
    q = torch.randn(len(lens), 1, h, d, generator=g).bfloat16()
    return q, cache, table, torch.tensor(lens)


@pytest.mark.parametrize("h,d,dv", [(4, 48, 32), (16, 576, 512)])  # the tiny preset's widths; DeepSeek-V3's
def test_triton_decode_matches_reference_over_pages_and_splits(h, d, dv):
    lens = [1, 64, 65, 200]  # one key, a full page, a page and one, several pages
    q, cache, table, seqlens = _paged(lens, h, d, seed=h)
    assert num_splits(len(lens), 1, table.shape[1]) == table.shape[1]  # every page its own split here: merged after
    got = mla_decode_triton(q, cache, table, seqlens, dv, 0.1)
    want = mla_decode(q.float(), cache.float(), table, seqlens, dv, 0.1)
    assert got.shape == (len(lens), 1, h, dv) and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2), (got.float() - want).abs().max()


def test_split_count_comes_from_host_sizes():
    assert num_splits(1, 1, 64) == 64 and num_splits(256, 8, 64) == 1 and num_splits(4, 2, 100) == 33


def test_a_table_wider_than_the_sequences_splits_their_own_pages():
    """A CUDA graph's block table is as wide as max_model_len: the splits still cover each sequence's pages."""
    lens = [1, 130, 300]
    q, cache, table, seqlens = _paged(lens, 4, 48, seed=3)
    wide = torch.cat([table, torch.zeros(len(lens), 60, dtype=table.dtype)], dim=1)  # [B, 65] pages
    assert num_splits(len(lens), 1, wide.shape[1]) > table.shape[1]  # more splits than any sequence has pages
    got = mla_decode_triton(q, cache, wide, seqlens, 32, 0.1)
    want = mla_decode(q.float(), cache.float(), table, seqlens, 32, 0.1)
    assert torch.isfinite(got).all() and torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2)
