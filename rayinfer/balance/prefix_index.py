"""Which rank probably holds which prompt prefix: the prefill LB's memory of where it sent pages.

Owns a bounded map from a page key (the block manager's chained hash of a prompt's full 64-token
pages, shortened by `page_keys`) to the ranks a request carrying that page was routed to, most recent
last. What crosses it: page keys in (from the request's cost), per-rank prefix lengths in tokens
out. Pure Python, no Ray. A rank computes, and so caches, every page of a prompt it is sent, and
writes them to the disk tier: a prefix seen on any rank is on disk for all (until evicted). The
index forgets least recently used pages past `max_pages`, as the ranks' caches do.
"""
from __future__ import annotations

from collections import OrderedDict

from rayinfer.engine.block_manager import prefix_hashes
from rayinfer.kernels import PAGE_SIZE as PAGE


def page_keys(token_ids: list[int], max_pages: int = 256) -> list[int]:
    """The block manager's chained page hashes of each full page a prefix cache can reuse (all but the
    one holding the last token), cut to 64-bit ints to travel light in a routing cost."""
    n = min((len(token_ids) - 1) // PAGE, max_pages)
    return [int.from_bytes(h[:8], "little") for h in prefix_hashes(token_ids, PAGE, n)]


class PrefixIndex:
    def __init__(self, max_pages: int = 200_000):
        self.max_pages = max_pages
        self.pages: OrderedDict[int, dict[str, None]] = OrderedDict()  # key -> ranks, insertion-ordered

    def record(self, keys: list[int], rank_id: str) -> None:
        for k in keys:
            ranks = self.pages.pop(k, None) or {}
            ranks.pop(rank_id, None)
            ranks[rank_id] = None
            self.pages[k] = ranks
        while len(self.pages) > self.max_pages:
            self.pages.popitem(last=False)

    def device_tokens(self, keys: list[int], rank_ids: list[str]) -> list[int]:
        """Per rank, the tokens of the longest prefix of `keys` it was sent (so holds on its device)."""
        out = []
        for r in rank_ids:
            n = 0
            while n < len(keys) and r in self.pages.get(keys[n], ()):
                n += 1
            out.append(n * PAGE)
        return out

    def seen_tokens(self, keys: list[int]) -> int:
        """Tokens of the longest prefix of `keys` sent to any rank (so on disk, with a disk tier)."""
        n = 0
        while n < len(keys) and keys[n] in self.pages:
            n += 1
        return n * PAGE

    def forget(self, rank_id: str) -> None:
        for ranks in self.pages.values():
            ranks.pop(rank_id, None)
