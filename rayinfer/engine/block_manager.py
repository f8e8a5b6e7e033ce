"""Pages of the MLA latent cache: allocation, reference counts, prefix caching, LRU eviction.

Plain Python: block ids index the per-layer cache tensors the model runner owns. A full block
of computed tokens gets a chained content hash (hash of the previous block's hash and its own
tokens), so a new request whose prompt starts with the same tokens reuses those pages. Freed
blocks keep their hash and stay findable until reallocated, least recently freed first; a
sequence's blocks are freed tail first so shared prefixes are evicted last.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from rayinfer.engine.sequence import Sequence
from rayinfer.kernels import PAGE_SIZE


def block_hash(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


def prefix_hashes(token_ids: list[int], block_size: int, num_blocks: int) -> list[bytes]:
    """The chained hashes of the first `num_blocks` full blocks of `token_ids`."""
    prev, out = b"", []
    for i in range(num_blocks):
        prev = block_hash(prev, token_ids[i * block_size:(i + 1) * block_size])
        out.append(prev)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = PAGE_SIZE, enable_prefix_caching: bool = True):
        assert num_blocks > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # content hash -> block id
        # Free pages, least recently freed first: ids from `_fresh` up were never used (they come first, so a
        # node-sized pool of millions of pages costs nothing to build), then `free`, pages released since.
        self._fresh = 0
        self.free: OrderedDict[int, None] = OrderedDict()
        self.hits = self.queries = 0  # prefix-cache statistics, in tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + self.num_blocks - self._fresh

    def free_block_ids(self) -> list[int]:
        """Every free page, in the order they will be reused."""
        return list(range(self._fresh, self.num_blocks)) + list(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Attaches cached blocks for the longest cached prefix of `seq`; returns the tokens reused.

        The last token is always left to compute, so the sequence has a row to sample from."""
        assert not seq.block_ids and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:  # those compute every prompt position
            return 0
        hits = []
        for h in prefix_hashes(seq.token_ids, self.block_size, self.num_matchable_blocks(seq)):
            bid = self.cached.get(h)
            if bid is None:
                break
            hits.append((bid, h))
        for bid, h in hits:
            self._ref(bid)
            seq.block_ids.append(bid)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.queries += seq.num_tokens
        self.hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def num_matchable_blocks(self, seq: Sequence) -> int:
        """Full blocks a prefix match may cover: all but the one holding the last token."""
        return (seq.num_tokens - 1) // self.block_size

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        return need <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grows `seq`'s block table to hold its next `num_new_tokens` tokens."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        assert need <= self.num_free_blocks, "append without can_append"
        for _ in range(need):
            if self._fresh < self.num_blocks:
                bid, self._fresh = self._fresh, self._fresh + 1
            else:
                bid, _ = self.free.popitem(last=False)
            if self.hashes[bid] is not None:  # evict its cached content
                del self.cached[self.hashes[bid]]
                self.hashes[bid] = None
            self.ref_counts[bid] = 1
            seq.block_ids.append(bid)

    def commit(self, seq: Sequence) -> None:
        """Registers the content hash of every block `seq` has newly filled with computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        prev = seq.block_hashes[-1] if seq.block_hashes else b""
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            h = block_hash(prev, seq.token_ids[i * bs:(i + 1) * bs])
            bid = seq.block_ids[i]
            if h not in self.cached and self.hashes[bid] is None:
                self.cached[h] = bid
                self.hashes[bid] = h
            seq.block_hashes.append(h)
            prev = h

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Rolls `seq` back to its first `num_tokens` tokens' KV (rejected speculative drafts): pages past
        them are dropped. Draft tokens never reach `num_computed_tokens` before they are verified, so no
        page being dropped, nor any hash, holds an unverified token."""
        assert seq.num_computed_tokens <= num_tokens, (seq, num_tokens)
        keep = self.blocks_needed(num_tokens)
        assert len(seq.block_hashes) <= keep
        for bid in reversed(seq.block_ids[keep:]):
            assert self.ref_counts[bid] == 1 and self.hashes[bid] is None, bid
            self.ref_counts[bid] = 0
            self.free[bid] = None
        del seq.block_ids[keep:]

    def release(self, seq: Sequence) -> None:
        """Drops `seq`'s references; pages no one references become free (tail first)."""
        for bid in reversed(seq.block_ids):
            self.ref_counts[bid] -= 1
            assert self.ref_counts[bid] >= 0
            if self.ref_counts[bid] == 0:
                self.free[bid] = None
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _ref(self, bid: int) -> None:
        if self.ref_counts[bid] == 0:
            del self.free[bid]  # a page with cached content was used, so it is never a fresh one
        self.ref_counts[bid] += 1

    def num_allocated_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks  # a page is free exactly when no sequence references it
