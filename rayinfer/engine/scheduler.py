"""Which tokens of which sequences run in the next step (plain Python, no torch).

Continuous batching under a token budget: running sequences first (one token each when decoding,
the next chunk when a long prompt is being prefilled in pieces), then waiting sequences in
arrival order, each admitted with whatever prefix the cache already holds. When pages run out
the most recently admitted running sequence is preempted: its pages are released and it is
recomputed later from its tokens, so preemption never changes what a request generates.

Only running sequences hold pages. A sequence that arrived with KV (`Sequence.pending_kv`: a
prefill rank's handoff, or prefix pages a lower tier read) waits like any other; admitting it
allocates its pages and lists the payload in `SchedulerOutput.imports`, which the engine writes
before the step runs. So a waiting request never blocks another's pages, and when nothing is
running the head of the queue always fits (`add` refuses what could never fit): every step with
work schedules something.

Modes: "mixed" (prefill and decode together), "prefill" (a disaggregated prefill rank: a
sequence leaves after its first sampled token) and "decode" (a decode rank: sequences arrive
with their KV; one that does not is prefilled here as a fallback). The scheduling rule is the
same in all three; the engine applies the mode when it postprocesses a step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rayinfer.config import SchedulerConfig
from rayinfer.engine.block_manager import BlockManager
from rayinfer.engine.sequence import PendingKV, Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # first position computed in this step
    # Speculative slots after the new tokens (a decoding sequence's drafts): pages are allocated for them and
    # they count in the token budget, but only the drafts the target verifies become computed tokens.
    num_draft_tokens: int = 0

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token (so a next token is sampled)."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    imports: list[tuple[Sequence, PendingKV]] = field(default_factory=list)  # write before running

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens + s.num_draft_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, num_speculative_tokens: int = 0):
        self.config = config
        self.bm = block_manager
        self.num_speculative_tokens = num_speculative_tokens  # drafts per decoding sequence, where they fit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Rejects a request that could never fit this engine's cache."""
        capacity = self.bm.num_blocks * self.bm.block_size
        need = seq.num_prompt_tokens + seq.params.max_tokens  # output tokens already there count in max_tokens
        if need > capacity:
            raise ValueError(f"request {seq.request_id!r} needs {need} tokens of KV cache (prompt + max_tokens); "
                             f"this engine's cache holds {capacity}")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or aborted sequence out and releases its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.pending_kv = None
        self.bm.release(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        done: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending_tokens, budget)
            drafts = self._num_drafts(seq, budget - n)
            if drafts and not self.bm.can_append(seq, n + drafts):
                drafts = 0  # speculation never preempts anyone
            while not self.bm.can_append(seq, n):
                victim = next(s for s in reversed(self.running) if id(s) not in done)
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            budget -= self._run(seq, n, out, drafts)
            done.add(id(seq))
        # New admissions only when nothing had to be preempted: admitting would just evict again.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self._allocate(seq, budget, out)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.first_admitted = True
            self.running.append(seq)
            budget -= self._run(seq, n, out)
        return out

    def _allocate(self, seq: Sequence, budget: int, out: SchedulerOutput) -> int:
        """Gives a waiting `seq` its pages (prefix hits or imported KV, and room for its next chunk);
        -> the tokens of that chunk, or 0 with no pages held when they do not fit now."""
        assert not seq.block_ids, f"waiting {seq} holds pages"
        kv = seq.pending_kv
        if kv is not None and kv.first_page is None:
            n = min(seq.num_tokens - kv.num_tokens, budget)
            assert n > 0 or budget == 0, f"{seq}: imported KV leaves nothing to compute"
            if self.bm.blocks_needed(kv.num_tokens + n) > self.bm.num_free_blocks:
                return 0
            self.bm.append(seq, kv.num_tokens)
            seq.num_computed_tokens, seq.pending_kv = kv.num_tokens, None
            out.imports.append((seq, kv))
            return n
        hit = self.bm.match_prefix(seq)
        pages = self._loaded_pages(seq, hit)
        if not seq.first_admitted:  # what the user is told was cached: the first admission's hit
            seq.num_cached_tokens = hit + len(pages) * self.bm.block_size
        n = min(seq.num_pending_tokens - len(pages) * self.bm.block_size, budget)
        if not self.bm.can_append(seq, len(pages) * self.bm.block_size + n):
            self.bm.release(seq)
            return 0
        if pages:
            ntok = len(pages) * self.bm.block_size
            self.bm.append(seq, ntok)
            seq.num_computed_tokens += ntok
            out.imports.append((seq, PendingKV(ntok, pages, first_page=hit // self.bm.block_size)))
        seq.pending_kv = None
        return n

    def _loaded_pages(self, seq: Sequence, hit: int) -> list:
        """The pages a lower tier loaded for `seq` that continue the `hit` tokens the device cache
        still holds (none when that prefix shrank below where they start: they are recomputed)."""
        kv = seq.pending_kv
        if kv is None:
            return []
        skip = hit // self.bm.block_size - kv.first_page
        return kv.payload[skip:] if skip >= 0 else []

    def _num_drafts(self, seq: Sequence, budget: int) -> int:
        """Draft slots for a decoding sequence: k where the budget allows, never more than its output can still
        take after the next token (so a draft's position is always inside max_tokens and the context)."""
        if not self.num_speculative_tokens or not seq.can_draft:
            return 0
        left = seq.params.max_tokens - seq.num_output_tokens - 1
        return max(0, min(self.num_speculative_tokens, budget, left))

    def _run(self, seq: Sequence, n: int, out: SchedulerOutput, drafts: int = 0) -> int:
        self.bm.append(seq, n + drafts)
        out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens, drafts))
        return n + drafts

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
