"""Which rank probably holds which prompt prefix: the prefill LB's memory of where it sent pages.

Owns a bounded map from a page key (a short chained hash of a prompt's full 64-token pages, as
`page_keys` computes it) to the ranks a request carrying that page was routed to, most recent
last. What crosses it: page keys in (from the request's cost), per-rank prefix lengths in tokens
out. Pure Python, no Ray. A rank computes, and so caches, every page of a prompt it is sent, and
writes them to the disk tier: a prefix seen on any rank is on disk for all (until evicted). The
index forgets least recently used pages past `max_pages`, as the ranks' caches do.
"""
from __future__ import annotations

import zlib
from array import array
from collections import OrderedDict

PAGE = 64


def page_keys(token_ids: list[int], max_pages: int = 256) -> list[int]:
    """Chained crc32 of each full page a prefix cache can reuse (all but the one holding the last token)."""
    keys, prev = [], 0
    for i in range(min((len(token_ids) - 1) // PAGE, max_pages)):
        prev = zlib.crc32(array("q", token_ids[i * PAGE:(i + 1) * PAGE]).tobytes(), prev)
        keys.append(prev)
    return keys


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
