"""Paged MLA decode as a Triton split-KV kernel: the CUDA path where FlashMLA is absent.

Reads the latent cache `[pages, 64, D]` in place, one token tile of a page at a time through the block table:
no gather of a sequence's rows into a new tensor and no fp32 copy of the cache. Tiles stay in the cache's
dtype (bf16 on a GPU) and feed `tl.dot` as they are, with fp32 accumulation; only the [heads, tokens]
scores and the [heads, dv] accumulator are fp32. Widening a 64x512 key tile to fp32 would double its
registers (256 per thread at 4 warps: spills, or OutOfResources on Hopper). Each program attends one
(sequence, key split, block of heads) with an online softmax and writes its partial output and log-sum-exp;
the splits are merged after. The number of splits comes from host-known sizes (batch, heads, block-table
width), never from the lengths on the device, so nothing waits on the device; each program divides its
sequence's own tiles (from the length on the device) over the splits, so a table wider than the sequences
(a CUDA graph's fixed width) idles no split. Token tile, warps and stages are autotuned over `CONFIGS`, keyed
on the head count and widths (and dtypes); the first call per key tunes (outside any graph capture: the
decode graphs warm up eagerly first).
Crosses: the `mla_decode` signature for one query per sequence.
Runs under `TRITON_INTERPRET=1` on CPU tensors, which is how it is tested without a GPU; there (triton 3.9)
`tl.dot` of bf16 tiles returns garbage and autotuning needs a GPU driver, so the interpreter widens the
already-rounded tiles to fp32 in registers and runs one config given explicitly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rayinfer.kernels import PAGE_SIZE, backends

# Token tile (a page or half/quarter of one), warps, stages. 16 heads x 64 tokens x 512 bf16 is 64 KiB
# per key tile: 4 warps hold it in 128 registers a thread, 8 warps in 64, leaving room for the fp32
# [16, 512] accumulator (32 KiB). fp32 inputs (a float32 model on a GPU) get the narrower token tiles only.
CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=2),
]
BLOCK_H = 16  # heads per program: the smallest tl.dot tile


@triton.jit
def _widen(x, WIDEN: tl.constexpr):
    if WIDEN:
        x = x.to(tl.float32)
    return x


@triton.jit
def _split_kernel(q_ptr, cache_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, scale, n_heads, table_width,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_DR: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    b, split, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_splits = tl.num_programs(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    dv = tl.arange(0, BLOCK_DV)  # latent columns (keys and values)
    dr = tl.arange(0, BLOCK_DR)  # rope columns (keys only)
    hmask = heads < n_heads
    q_row = q_ptr + (b * n_heads + heads)[:, None] * D
    q_lat = _widen(tl.load(q_row + dv[None, :], mask=hmask[:, None] & (dv[None, :] < DV), other=0.0), WIDEN)
    q_pe = _widen(tl.load(q_row + DV + dr[None, :], mask=hmask[:, None] & (dr[None, :] < D - DV), other=0.0), WIDEN)
    length = tl.load(lens_ptr + b)
    n_tiles = (length + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (n_tiles + n_splits - 1) // n_splits  # the sequence's own tiles, not the table's width, are split
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    tok = tl.arange(0, BLOCK_N)
    for t in range(first, last):
        start = t * BLOCK_N  # first token of the tile: inside page start // PAGE (BLOCK_N divides PAGE)
        page = tl.load(table_ptr + b * table_width + start // PAGE).to(tl.int64)
        rows = cache_ptr + (page * PAGE + start % PAGE + tok)[:, None] * D  # [N, 1] rows of this tile, in place
        valid = start + tok < length
        k_lat = _widen(tl.load(rows + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0), WIDEN)
        k_pe = _widen(tl.load(rows + DV + dr[None, :], mask=valid[:, None] & (dr[None, :] < D - DV), other=0.0), WIDEN)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PREC)
        s = (s + tl.dot(q_pe, tl.trans(k_pe), input_precision=PREC)) * scale  # [BH, N] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        prob = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        # The probabilities meet the values in the values' dtype (as flash attention does), summed in fp32.
        p_tile = _widen(prob.to(cache_ptr.dtype.element_ty), WIDEN)
        acc = acc * alpha[:, None] + tl.dot(p_tile, k_lat, input_precision=PREC)
        m_i = m_new
    part = (b * n_splits + split) * n_heads + heads  # [BH] row of (sequence, split, head)
    has = l_i > 0
    tl.store(out_ptr + part[:, None] * DV + dv[None, :], acc / tl.where(has, l_i, 1.0)[:, None],
             mask=hmask[:, None] & (dv[None, :] < DV))
    tl.store(lse_ptr + part, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=hmask)


def _prune(configs, named_args, **kwargs):
    """fp32 caches get the narrow token tiles only (a 64-token fp32 tile is the spill this kernel avoids)."""
    wide = named_args["cache_ptr"].element_size() > 2
    kept = [c for c in configs if not wide or c.kwargs["BLOCK_N"] <= 32]
    return kept or configs


_tuned_kernel = triton.autotune(configs=CONFIGS, key=["n_heads", "D", "DV"],
                                prune_configs_by={"early_config_prune": _prune})(_split_kernel)


def num_splits(batch: int, head_blocks: int, table_width: int, target_programs: int = 264) -> int:
    """Key splits per sequence so that the grid fills the GPU (about 2 programs per SM of an H200)."""
    return max(1, min(table_width, -(-target_programs // max(1, batch * head_blocks))))


def mla_decode_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      cache_seqlens: torch.Tensor, dv: int, softmax_scale: float,
                      config: triton.Config | None = None) -> torch.Tensor:
    """q [B, 1, h, D]; kv_cache [P, 64, D]; block_table [B, M]; cache_seqlens [B] -> out [B, 1, h, dv].

    `config`: one of `CONFIGS` to run instead of autotuning (the interpreter always runs one: the first
    that `_prune` keeps for the cache's dtype, unless given)."""
    b, s_q, h, d = q.shape
    assert s_q == 1 and kv_cache.shape[1] == PAGE_SIZE and kv_cache.shape[2] == d, (q.shape, kv_cache.shape)
    head_blocks = -(-h // BLOCK_H)
    width = block_table.shape[1]
    splits = num_splits(b, head_blocks, width)
    out = torch.empty(b, splits, h, dv, dtype=torch.float32, device=q.device)  # partials: small, [B, S, h, dv]
    lse = torch.empty(b, splits, h, dtype=torch.float32, device=q.device)
    args = (q.contiguous(), kv_cache, block_table.to(torch.int32).contiguous(), cache_seqlens.to(torch.int32),
            out, lse, softmax_scale, h, width)
    meta = dict(D=d, DV=dv, BLOCK_H=BLOCK_H, BLOCK_DV=triton.next_power_of_2(dv),
                BLOCK_DR=max(16, triton.next_power_of_2(d - dv)), PAGE=PAGE_SIZE,
                PREC="ieee" if kv_cache.dtype == torch.float32 else None, WIDEN=backends.triton_interpreting())
    grid = (b, splits, head_blocks)
    if config is None and backends.triton_interpreting():
        config = _prune(CONFIGS, {"cache_ptr": kv_cache})[0]
    if config is None:
        _tuned_kernel[grid](*args, **meta)
    else:
        _split_kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    weight = torch.softmax(lse, dim=1).nan_to_num_(0.0)  # [B, S, h]: each split's share of the softmax mass
    return (out * weight[..., None]).sum(dim=1, keepdim=True).to(q.dtype)  # [B, 1, h, dv]


def probe_triton_mla() -> None:
    """Health probe (run in a child by kernels.probe): the autotuned kernel, then every config, against the
    reference on a small paged batch (a config that cannot compile on this GPU fails the probe here, not a rank)."""
    from rayinfer.kernels.mla import FLASH_MLA_DV, check_against_reference, probe_batch

    q, cache, table, seqlens = probe_batch()
    for config in [None, *CONFIGS]:
        got = mla_decode_triton(q, cache, table, seqlens, FLASH_MLA_DV, 0.07, config=config)
        check_against_reference(f"triton_mla {config}", got, q, cache, table, seqlens, FLASH_MLA_DV, 0.07)
