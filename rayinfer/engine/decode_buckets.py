"""Decode steps padded to a fixed set of batch sizes: the shapes a CUDA graph per bucket replays.

Owns the bucket sizes and the padding of a decode-only step with dummy sequences. A dummy is one
token at position 0 whose only page is the runner's scratch page (one page past those the block
manager hands out), so it writes and reads nothing any real sequence owns; its row is never
sampled. Crosses: the runner's step items in, the same items plus dummies out.

Only a single-rank engine pads and captures (`cuda_graphs` holds a graph per bucket). A gang's
MoE layers exchange data-dependent counts with the other ranks (all-to-all splits read on the
host), which a graph cannot replay, and a gang steps in lockstep with ranks of other batch sizes;
there decode stays eager. Chunked prefill always stays eager.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8, the last one covering `max_num_seqs`."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
    candidates = [1, 2, 4, *range(8, max_num_seqs + 8, 8)]
    return [b for b in candidates if b < max_num_seqs] + [min(b for b in candidates if b >= max_num_seqs)]


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest bucket holding `n` sequences."""
    for b in sizes:
        if b >= n:
            return b
    raise ValueError(f"{n} decode sequences exceed the largest bucket {sizes[-1]}")


@dataclass
class _Dummy:
    """The part of a `Sequence` the runner reads when preparing a step."""

    block_ids: list[int]
    token_ids: list[int] = field(default_factory=lambda: [0])
    num_tokens: int = 1


def is_decode_step(items: list[tuple]) -> bool:
    """Every item adds one token after cached context: (sequence, first position, number of tokens)."""
    return bool(items) and all(n == 1 and start > 0 for _, start, n in items)


def pad_decode(items: list[tuple], sizes: list[int], scratch_page: int) -> list[tuple]:
    """A decode step's items followed by dummies up to its bucket."""
    dummy = _Dummy([scratch_page])
    return items + [(dummy, 0, 1)] * (bucket_for(len(items), sizes) - len(items))
