"""The Triton split-KV paged MLA decode kernel against the reference, under Triton's CPU interpreter (scoped to
these tests by the `triton_interpreter` fixture), over every autotune config, and its tiles sized for Hopper."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

from rayinfer.kernels.mla import PAGE_SIZE, mla_decode

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture
def tm(triton_interpreter):
    return triton_interpreter("rayinfer.kernels.triton_mla")


def _paged(lens: list[int], h: int, d: int, seed: int, dtype=torch.bfloat16):
    """Pages in a shuffled order; rows no sequence owns (page tails, spare pages) hold NaN."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // PAGE_SIZE) for n in lens]
    pages = sum(need) + 2
    cache = torch.full((pages, PAGE_SIZE, d), float("nan"), dtype=dtype)
    order = torch.randperm(pages, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.long)
    start = 0
    for b, (n, k) in enumerate(zip(lens, need)):
        table[b, :k] = order[start:start + k]
        start += k
        for j in range(n):
            cache[table[b, j // PAGE_SIZE], j % PAGE_SIZE] = torch.randn(d, generator=g)
    q = torch.randn(len(lens), 1, h, d, generator=g).to(dtype)
    return q, cache, table, torch.tensor(lens)


@pytest.mark.parametrize("h,d,dv", [(4, 48, 32), (16, 576, 512)])  # the tiny preset's widths; DeepSeek-V3's
def test_triton_decode_matches_reference_over_pages_and_splits(tm, h, d, dv):
    lens = [1, 64, 65, 200]  # one key, a full page, a page and one, several pages
    q, cache, table, seqlens = _paged(lens, h, d, seed=h)
    assert tm.num_splits(len(lens), 1, table.shape[1]) == table.shape[1]  # every page its own split here: merged after
    got = tm.mla_decode_triton(q, cache, table, seqlens, dv, 0.1)
    want = mla_decode(q.float(), cache.float(), table, seqlens, dv, 0.1)
    assert got.shape == (len(lens), 1, h, dv) and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2), (got.float() - want).abs().max()


@pytest.mark.parametrize("index", range(5))
def test_every_autotune_config_matches_the_reference(tm, index):
    """Each token tile (a page, half, a quarter of one) walks the pages right: what the autotuner may pick on a GPU."""
    config = tm.CONFIGS[index]
    lens = [1, 33, 64, 150]  # tiles that straddle nothing, end mid-tile, fill a page, cross pages
    q, cache, table, seqlens = _paged(lens, 4, 48, seed=index)
    got = tm.mla_decode_triton(q, cache, table, seqlens, 32, 0.1, config=config)
    want = mla_decode(q.float(), cache.float(), table, seqlens, 32, 0.1)
    assert torch.isfinite(got).all() and torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2), config


def test_fp32_cache_runs_narrow_tiles_exactly(tm):
    q, cache, table, seqlens = _paged([5, 130], 4, 48, seed=9, dtype=torch.float32)
    kept = tm._prune(tm.CONFIGS, {"cache_ptr": cache})
    assert kept and all(c.kwargs["BLOCK_N"] <= 32 for c in kept)  # a 64-token fp32 tile is the spill avoided
    got = tm.mla_decode_triton(q, cache, table, seqlens, 32, 0.1)
    assert torch.allclose(got, mla_decode(q, cache, table, seqlens, 32, 0.1), atol=1e-4)


def test_tiles_stay_in_the_cache_dtype_and_the_configs_fit_hopper_registers(tm):
    """The kernel feeds tl.dot its tiles in the cache's dtype (bf16 on a GPU; widened only under the interpreter,
    by `_widen`), and every config's bf16 key tile plus the fp32 [16, 512] accumulator fits the registers of its
    warps with room to spare (sm90: at most 255 32-bit registers a thread)."""
    src = inspect.getsource(tm._split_kernel.fn)
    assert ".to(tl.float32)" not in src and "_widen(tl.load(rows" in src
    for c in tm.CONFIGS:
        k_tile = c.kwargs["BLOCK_N"] * 512 * 2  # bytes: the bf16 latent key tile
        acc = tm.BLOCK_H * 512 * 4  # bytes: the fp32 accumulator
        assert (k_tile + acc) / 4 / (32 * c.num_warps) <= 192, c  # leaves room for q, scores and addresses
        assert PAGE_SIZE % c.kwargs["BLOCK_N"] == 0 and c.num_stages >= 1
    assert len({(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tm.CONFIGS}) == len(tm.CONFIGS) >= 3
    assert tm._tuned_kernel.keys == ["n_heads", "D", "DV"]


def test_split_count_comes_from_host_sizes(tm):
    assert tm.num_splits(1, 1, 64) == 64 and tm.num_splits(256, 8, 64) == 1 and tm.num_splits(4, 2, 100) == 33


def test_a_table_wider_than_the_sequences_splits_their_own_pages(tm):
    """A CUDA graph's block table is as wide as max_model_len: the splits still cover each sequence's pages."""
    lens = [1, 130, 300]
    q, cache, table, seqlens = _paged(lens, 4, 48, seed=3)
    wide = torch.cat([table, torch.zeros(len(lens), 60, dtype=table.dtype)], dim=1)  # [B, 65] pages
    assert tm.num_splits(len(lens), 1, wide.shape[1]) > table.shape[1]  # more splits than any sequence has pages
    got = tm.mla_decode_triton(q, cache, wide, seqlens, 32, 0.1)
    want = mla_decode(q.float(), cache.float(), table, seqlens, 32, 0.1)
    assert torch.isfinite(got).all() and torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2)
