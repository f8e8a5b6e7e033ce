"""Paged MLA decode as a Triton split-KV kernel: the CUDA path where FlashMLA is absent.

Reads the latent cache `[pages, 64, D]` in place, one page tile at a time through the block table:
no gather of a sequence's rows into a new tensor and no fp32 copy of the cache (tiles are widened in
registers). Each program attends one (sequence, key split, block of heads) with an online softmax
and writes its partial output and log-sum-exp; the splits are merged after. The number of splits
comes from host-known sizes (batch, heads, block-table width), never from the lengths on the device,
so nothing waits on the device; each program divides its sequence's own pages (from the length on the
device) over the splits, so a table wider than the sequences (a CUDA graph's fixed width) idles no
split. Crosses: the `mla_decode` signature for one query per sequence.
Runs under `TRITON_INTERPRET=1` on CPU tensors, which is how it is tested without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PAGE = 64


@triton.jit
def _split_kernel(q_ptr, cache_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, scale, n_heads, table_width,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_N: tl.constexpr):
    b, split, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_splits = tl.num_programs(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    dv = tl.arange(0, BLOCK_DV)  # latent columns (keys and values)
    dr = tl.arange(0, BLOCK_DR)  # rope columns (keys only)
    hmask = heads < n_heads
    q_row = q_ptr + (b * n_heads + heads)[:, None] * D
    q_lat = tl.load(q_row + dv[None, :], mask=hmask[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
    q_pe = tl.load(q_row + DV + dr[None, :], mask=hmask[:, None] & (dr[None, :] < D - DV), other=0.0).to(tl.float32)
    length = tl.load(lens_ptr + b)
    n_pages = tl.cdiv(length, BLOCK_N)
    pages_per_split = tl.cdiv(n_pages, n_splits)  # the sequence's own pages, not the table's width, are split
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, n_pages)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    tok = tl.arange(0, BLOCK_N)
    for p in range(first, last):
        page = tl.load(table_ptr + b * table_width + p).to(tl.int64)
        rows = cache_ptr + (page * BLOCK_N + tok)[:, None] * D  # [N, 1] rows of this page, read in place
        valid = p * BLOCK_N + tok < length
        k_lat = tl.load(rows + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
        k_pe = tl.load(rows + DV + dr[None, :], mask=valid[:, None] & (dr[None, :] < D - DV), other=0.0).to(tl.float32)
        s = (tl.dot(q_lat, tl.trans(k_lat)) + tl.dot(q_pe, tl.trans(k_pe))) * scale  # [BH, N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        prob = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        acc = acc * alpha[:, None] + tl.dot(prob, k_lat)
        m_i = m_new
    part = (b * n_splits + split) * n_heads + heads  # [BH] row of (sequence, split, head)
    has = l_i > 0
    tl.store(out_ptr + part[:, None] * DV + dv[None, :], acc / tl.where(has, l_i, 1.0)[:, None],
             mask=hmask[:, None] & (dv[None, :] < DV))
    tl.store(lse_ptr + part, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=hmask)


def num_splits(batch: int, head_blocks: int, table_width: int, target_programs: int = 264) -> int:
    """Key splits per sequence so that the grid fills the GPU (about 2 programs per SM of an H200)."""
    return max(1, min(table_width, -(-target_programs // max(1, batch * head_blocks))))


def mla_decode_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      cache_seqlens: torch.Tensor, dv: int, softmax_scale: float) -> torch.Tensor:
    """q [B, 1, h, D]; kv_cache [P, 64, D]; block_table [B, M]; cache_seqlens [B] -> out [B, 1, h, dv]."""
    b, s_q, h, d = q.shape
    assert s_q == 1 and kv_cache.shape[1] == PAGE and kv_cache.shape[2] == d, (q.shape, kv_cache.shape)
    block_h = 16  # the smallest tl.dot tile; keeps the [heads, dv] fp32 accumulator in registers at dv 512
    head_blocks = -(-h // block_h)
    width = block_table.shape[1]
    splits = num_splits(b, head_blocks, width)
    out = torch.empty(b, splits, h, dv, dtype=torch.float32, device=q.device)  # partials: small, [B, S, h, dv]
    lse = torch.empty(b, splits, h, dtype=torch.float32, device=q.device)
    _split_kernel[(b, splits, head_blocks)](
        q.contiguous(), kv_cache, block_table.to(torch.int32).contiguous(), cache_seqlens.to(torch.int32),
        out, lse, softmax_scale, h, width, D=d, DV=dv, BLOCK_H=block_h,
        BLOCK_DV=triton.next_power_of_2(dv), BLOCK_DR=max(16, triton.next_power_of_2(d - dv)), BLOCK_N=PAGE)
    weight = torch.softmax(lse, dim=1).nan_to_num_(0.0)  # [B, S, h]: each split's share of the softmax mass
    return (out * weight[..., None]).sum(dim=1, keepdim=True).to(q.dtype)  # [B, 1, h, dv]


def probe_triton_mla() -> None:
    """Health probe (run in a child by kernels.probe): the kernel against the reference on a small paged batch."""
    from rayinfer.kernels.mla import FLASH_MLA_DV, check_against_reference, probe_batch

    q, cache, table, seqlens = probe_batch()
    got = mla_decode_triton(q, cache, table, seqlens, FLASH_MLA_DV, 0.07)
    check_against_reference("triton_mla", got, q, cache, table, seqlens, FLASH_MLA_DV, 0.07)
