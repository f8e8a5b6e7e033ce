"""The engine's side of the on-disk KV tier: which pages to load before a request runs, and which to write.

Owns the requests parked while their prefix pages load and, per request, how many of its full
pages are already on disk (or queued). What crosses it: sequences from the engine, page hashes
and payload bytes to and from `DiskCache`, block ids and payloads to and from the model runner
(`read_page`, `write_pages`). Plain Python; the engine calls `admit` when a request arrives,
`ready` before each schedule and `written` after each commit.

A load is "pages to import before running", the same shape as a request that arrives with KV: the
request waits outside the scheduler's queue while the reader thread works, and when the pages are
back it enters the queue carrying them (`Sequence.pending_kv`); the scheduler puts them into pages
it allocates when it admits the request, after the prefix the device cache still holds. Anything
that goes wrong (a page evicted meanwhile, no room on the device, a bad file) only shortens the
prefix reused.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait

from rayinfer.engine.block_manager import BlockManager, prefix_hashes
from rayinfer.engine.disk_cache import DiskCache
from rayinfer.engine.sequence import PendingKV, Sequence


class DiskTier:
    def __init__(self, cache: DiskCache, block_manager: BlockManager, runner):
        self.cache, self.bm, self.runner = cache, block_manager, runner
        self.loading: dict[str, tuple[Sequence, int, Future]] = {}  # request id -> (seq, first page loaded, load)
        self.on_disk: dict[str, int] = {}  # request id -> leading full pages on disk or queued for it

    def admit(self, seq: Sequence) -> bool:
        """Starts loading the pages of `seq`'s prefix that are on disk but not on the device; True: it must wait."""
        if seq.needs_prompt_logprobs:  # it computes every prompt position (engine/prompt_logprobs)
            return False
        hashes = prefix_hashes(seq.token_ids, self.bm.block_size, self.bm.num_matchable_blocks(seq))
        k = 0
        while k < len(hashes) and hashes[k] in self.bm.cached:
            k += 1
        if k == len(hashes) or not self.cache.contains(hashes[k]):
            return False
        self.loading[seq.request_id] = (seq, k, self.cache.load_async(hashes[k:]))
        return True

    def ready(self, block: bool = False) -> list[Sequence]:
        """Parked sequences whose loads finished, their loaded pages installed; `block`: wait a moment for one."""
        if block and self.loading:
            wait([f for _, _, f in self.loading.values()], timeout=0.005, return_when=FIRST_COMPLETED)
        out = []
        for rid, (seq, first, fut) in list(self.loading.items()):
            if fut.done():
                del self.loading[rid]
                self._install(seq, first, fut.result() if fut.exception() is None else [])
                out.append(seq)
        return out

    def _install(self, seq: Sequence, first: int, payloads: list[bytes]) -> None:
        """Hands the loaded pages to the scheduler, which writes them when it admits `seq`."""
        if payloads:
            seq.pending_kv = PendingKV(len(payloads) * self.bm.block_size, payloads, first_page=first)

    def written(self, seq: Sequence) -> None:
        """Queues the full pages `seq` has newly computed; pages it reused are on disk already."""
        rid = seq.request_id
        done = self.on_disk.setdefault(rid, seq.num_cached_tokens // self.bm.block_size)
        for i in range(done, len(seq.block_hashes)):
            if not self.cache.can_accept():  # the writer is behind: drop, never wait (nor copy the page)
                self.cache.count_dropped()
                continue
            self.cache.write_async(seq.block_hashes[i], self.runner.read_page(seq.block_ids[i]))
        self.on_disk[rid] = max(done, len(seq.block_hashes))

    def mark_on_disk(self, seq: Sequence) -> None:
        """`seq`'s current pages need no writing (they arrived from elsewhere that wrote them)."""
        self.on_disk[seq.request_id] = len(seq.block_hashes)

    def forget(self, request_id: str) -> None:
        self.loading.pop(request_id, None)
        self.on_disk.pop(request_id, None)

    def stats(self) -> dict:
        return {f"disk_{k}": v for k, v in self.cache.stats().items()} | {"disk_loading": len(self.loading)}
