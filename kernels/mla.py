"""Paged MLA decode attention over the compressed (latent + rope key) cache.

The cache holds, per token, the normalised KV latent (kv_lora_rank values) followed by the
rope key, in pages of 64 tokens: `kv_cache [num_pages, 64, D]`. Queries come already absorbed
(`q [B, s_q, h, D]`: latent-space nope part + rope part), so one cached row serves as key (all
D values) and value (the first `dv` values). FlashMLA is used on Hopper when installed.
"""
from __future__ import annotations

import torch

from rayinfer.kernels import backends

PAGE_SIZE = 64


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               dv: int, softmax_scale: float, causal: bool = True) -> torch.Tensor:
    """q [B, s_q, h, D]; kv_cache [P, 64, D]; block_table [B, M]; cache_seqlens [B] -> out [B, s_q, h, dv].

    Query i of s_q sits at position cache_seqlens - s_q + i and (when causal) sees keys up to it.
    """
    if backends.usable("flash_mla", q, kv_cache) and q.dtype == torch.bfloat16:
        return _flash_mla(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale, causal)
    b, s_q, h, d = q.shape
    s_max = block_table.shape[1] * PAGE_SIZE
    lens = cache_seqlens.to(kv_cache.device).long()
    key_pos = torch.arange(s_max, device=kv_cache.device)  # [S]
    rows = block_table[:, key_pos // PAGE_SIZE] * PAGE_SIZE + key_pos % PAGE_SIZE  # [B, S] cache rows
    # Positions past a sequence's length read its own first row instead of whatever the page holds
    # (maybe NaN), so their zero attention weight times a finite value stays zero.
    rows = torch.where(key_pos[None, :] < lens[:, None], rows, rows[:, :1])
    kv = kv_cache.view(-1, d).index_select(0, rows.view(-1)).view(b, s_max, d)
    limit = lens[:, None] - s_q + 1 + torch.arange(s_q, device=kv.device)[None] if causal else \
        lens[:, None].expand(b, s_q)  # [B, s_q] keys visible to each query
    visible = key_pos[None, None, :] < limit[:, :, None]  # [B, s_q, S]
    kv = kv.float()
    scores = torch.bmm(q.float().reshape(b, s_q * h, d), kv.transpose(1, 2)) * softmax_scale  # [B, s_q*h, S]
    scores = scores.view(b, s_q, h, -1).masked_fill_(~visible[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).view(b, s_q * h, -1)
    # All D columns then the first dv: cheaper than copying the value slice of every row.
    return torch.bmm(probs, kv)[..., :dv].reshape(b, s_q, h, dv).to(q.dtype)


def _flash_mla(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale, causal):
    fm = backends.module("flash_mla")
    seqlens = cache_seqlens.to(torch.int32)
    meta, splits = fm.get_mla_metadata(seqlens, q.shape[1] * q.shape[2], 1)
    out, _lse = fm.flash_mla_with_kvcache(q, kv_cache.unsqueeze(2), block_table.to(torch.int32), seqlens, dv,
                                          meta, splits, softmax_scale=softmax_scale, causal=causal)
    return out
