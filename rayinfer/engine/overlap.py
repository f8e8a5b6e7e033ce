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



def balanced_split(costs: list[float]) -> tuple[list[int], list[int]]:
    """Indices into two groups with near-equal total cost (largest first, to the lighter group)."""
    groups, totals = ([], []), [0.0, 0.0]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        g = 0 if totals[0] <= totals[1] else 1
        groups[g].append(i)
        totals[g] += costs[i]
    return sorted(groups[0]), sorted(groups[1])


def microbatch(model, ids: torch.Tensor, batch, ctx, decode_split: bool):
    """Generator running one microbatch through every layer (`Block.stages`); returns the final hidden states [T, H]."""
    x = model.embed_tokens(ids)
    for block in model.layers:
        x = yield from block.stages(x, batch, ctx, decode_split)
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
