"""One simulated rank: the project's real `Engine` (so its real `Scheduler`, `BlockManager` and on-disk tier
logic `DiskTier`) over a runner that computes nothing and a disk store that holds page hashes only.

Owns `SimRunner` (records what each step computes as a `RankBatch` for the cost model; samples a fixed
token; never ends a request early: lengths come from the workload), `SimDiskStore` (the shared disk
tier's contents and LRU budget, in pages, with loads that finish at a simulated time) and `SimRank`.
What crosses it: `EngineRequest`s in, the engine's `Delta`s and the step's `RankBatch` out.
"""
from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future

from rayinfer.config import EngineConfig
from rayinfer.engine.disk_tier import DiskTier
from rayinfer.engine.engine import Engine
from rayinfer.sim.cost import RankBatch

TOKEN = 7  # what every simulated step samples; never an EOS (the runner names none)


class _Latents:
    """Stands in for a KV handoff [layers, tokens, D]: the engine only reads its shape."""

    def __init__(self, num_tokens: int):
        self.shape = (0, num_tokens, 0)


class SimRunner:
    checkpoint_path = None
    eos_token_ids: tuple = ()
    vocab_size = 1 << 62

    def __init__(self, num_blocks: int, max_model_len: int):
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self.last = RankBatch()

    def execute(self, sched) -> dict:
        self.last = RankBatch.from_scheduled(sched.scheduled)
        return {s.seq.request_id: (TOKEN, None) for s in sched.scheduled if s.samples}

    def import_kv(self, seq, latents) -> None:
        pass

    def export_kv(self, seq) -> _Latents:
        return _Latents(seq.num_computed_tokens)

    def read_page(self, block_id: int) -> None:
        return None

    def write_pages(self, block_ids, payloads) -> None:
        pass

    def kv_fingerprint(self) -> str:
        return "sim"


class SimDiskStore:
    """The on-disk tier every rank shares: which page hashes it holds (LRU, `capacity_pages`), what a load
    costs (`page_bytes` at `read_bytes_s` per rank) and the counters `DiskTier` reports. A load's future
    completes when `tick` reaches its simulated finish time."""

    def __init__(self, capacity_pages: int, page_bytes: float, read_bytes_s: float):
        self.capacity, self.page_bytes, self.read_bytes_s = capacity_pages, page_bytes, read_bytes_s
        self.pages: OrderedDict[bytes, None] = OrderedDict()
        self.pending: list[tuple[float, Future, list]] = []
        self.now = 0.0
        self.hit_tokens = self.miss_tokens = self.writes = 0

    def contains(self, h: bytes) -> bool:
        return h in self.pages

    def load_async(self, hashes: list[bytes]) -> Future:
        got = []
        for h in hashes:
            if h not in self.pages:
                break
            self.pages.move_to_end(h)
            got.append(None)
        self.hit_tokens += len(got) * 64
        self.miss_tokens += (len(hashes) - len(got)) * 64
        fut: Future = Future()
        self.pending.append((self.now + len(got) * self.page_bytes / self.read_bytes_s, fut, got))
        return fut

    def tick(self, now: float) -> float | None:
        """Completes the loads due by `now`; -> the next pending finish time (None: none)."""
        self.now = now
        left = []
        for due, fut, got in self.pending:
            if due <= now:
                fut.set_result(got)
            else:
                left.append((due, fut, got))
        self.pending = left
        return min((d for d, _, _ in left), default=None)

    def can_accept(self) -> bool:
        return True

    def write_async(self, h: bytes, payload) -> bool:
        self.pages[h] = None
        self.pages.move_to_end(h)
        self.writes += 1
        while len(self.pages) > self.capacity:
            self.pages.popitem(last=False)
        return True

    def count_dropped(self) -> None:
        pass

    def stats(self) -> dict:
        return {"hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens, "pages": len(self.pages)}


class SimRank:
    def __init__(self, rank_id: str, role: str, kv_tokens: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, disk: SimDiskStore | None = None):
        self.id, self.role = rank_id, role
        cfg = EngineConfig.from_options("sim", max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                        scheduler_mode=role, max_model_len=max_model_len)
        self.runner = SimRunner(max(1, kv_tokens // 64), max_model_len)
        self.engine = Engine(cfg, runner=self.runner)
        if disk is not None:
            self.engine.disk = DiskTier(disk, self.engine.block_manager, self.runner)
        self.disk = disk

    def step(self) -> tuple[list, RankBatch]:
        """One engine step (an empty batch when it has no work: its gang steps anyway)."""
        eng = self.engine
        if eng.disk is not None and not eng.scheduler.has_work():
            for seq in eng.disk.ready():  # the engine would wait on the loads in real time: time is simulated
                eng.scheduler.add(seq)
        if not eng.scheduler.has_work():
            return [], RankBatch()
        deltas = self.engine.step()
        self.engine.exports.clear()  # the handoff's bytes are the cost model's business, not the engine's
        return deltas, self.runner.last

    @property
    def kv_usage(self) -> float:
        return self.engine.block_manager.usage
