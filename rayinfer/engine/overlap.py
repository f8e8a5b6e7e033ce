"""Dual-microbatch execution: one microbatch computes while the other's all-to-all is in flight.

A step's sequences are split into two microbatches of balanced attention load (a lone sequence
is split by tokens: its second half attends over the first half's cached latents, written
earlier in the same layer). Each microbatch runs as a generator that yields right after it
launches a dispatch or combine; alternating the two gives DeepSeek's prefill overlap (one's
attention and shared expert hide the other's dispatch and combine). With `decode_split`,
attention is split into ATTN-0 (projections) and ATTN-1 (core attention, output projection,
gate), adding a yield between them: the decode pipeline. With one microbatch the same generator
runs straight through, so overlap on and off compute exactly the same operations.
"""
from __future__ import annotations

import torch

from rayinfer.model.moe import MoE


def balanced_split(costs: list[float]) -> tuple[list[int], list[int]]:
    """Indices into two groups with near-equal total cost (largest first, to the lighter group)."""
    groups, totals = ([], []), [0.0, 0.0]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        g = 0 if totals[0] <= totals[1] else 1
        groups[g].append(i)
        totals[g] += costs[i]
    return sorted(groups[0]), sorted(groups[1])


def microbatch(model, ids: torch.Tensor, batch, ctx, decode_split: bool):
    """Generator running one microbatch through every layer; returns the final hidden states [T, H]."""
    x = model.embed_tokens(ids)
    for block in model.layers:
        attn = block.self_attn
        cache = batch.kv_caches[block.layer_idx] if batch.kv_caches is not None else None
        h = block.input_layernorm(x)
        if decode_split:
            proj = attn.project(h, batch)
            yield  # ATTN-0 done
            x = x + attn.attend(proj, batch, cache)
        else:
            x = x + attn(h, batch, cache)
        h = block.post_attention_layernorm(x)
        if not isinstance(block.mlp, MoE):
            x = x + block.mlp(h)
            continue
        moe = block.mlp
        weights, idx = moe.gate(h)
        handle = ctx.dispatch_launch(moe.layer_idx, h, idx, weights)
        yield  # dispatch in flight
        shared = moe.shared(h)
        recv = ctx.dispatch_wait(handle)
        handle = ctx.combine_launch(moe.experts(recv.x, recv.slots, recv.weights), handle)
        yield  # combine in flight
        x = x + (ctx.combine_wait(handle) + shared)
    return x


def run_interleaved(gens: list) -> list[torch.Tensor]:
    """Advances the generators in turn until all are done; returns their results in order."""
    results: list = [None] * len(gens)
    live = list(range(len(gens)))
    while live:
        for i in list(live):
            try:
                next(gens[i])
            except StopIteration as stop:
                results[i] = stop.value
                live.remove(i)
    return results
