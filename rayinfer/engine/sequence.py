"""A request's state inside one rank's engine (plain Python, no torch).

`token_ids` holds the prompt followed by the generated tokens; `num_computed_tokens` counts the
leading tokens whose latents are in the KV cache. Each step computes the next chunk of
`token_ids[num_computed_tokens:]`; when a chunk reaches the end, a new token is sampled. This one
view covers prefill, chunked prefill, decode and recomputation after preemption.

A sequence may arrive with KV computed elsewhere (`pending_kv`): latents for its first tokens
that the scheduler has written into pages when, and only when, it admits the sequence.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from rayinfer.messages import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class PendingKV:
    """KV computed elsewhere, to write into a sequence's pages when the scheduler admits it.

    A prefill rank's handoff: latents for the first `num_tokens` tokens, `payload` [layers,
    num_tokens, D] as the runner's `import_kv` takes it (`first_page` None). Or prefix pages a
    lower KV tier (the disk) has read: `payload` a list of page payloads for the full pages from
    `first_page` on, which extend whatever prefix the device cache still holds at admission."""

    num_tokens: int
    payload: object
    first_page: int | None = None


@dataclass
class Accepted:
    """What a speculative step emits for one sequence: its accepted drafts, then one corrected or bonus token
    (`tokens`, with their logprobs or Nones), out of `num_drafts` drafted; the engine appends them one by one."""

    tokens: list[int]
    logprobs: list
    num_drafts: int
    num_accepted: int


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits when first admitted
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full, computed blocks
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.first_admitted = False
        # Seed of the sampling noise: params.seed, or drawn by the sampler at the first sample (or carried
        # over on a resume); with the token position it fixes every sampled token.
        self.sample_seed: int | None = params.seed
        self.detokenizer = None
        self.pending_kv: PendingKV | None = None  # imported when admitted; dropped if preempted or aborted
        # The drafter's state (engine/drafter.py): the target's hidden rows of the last positions computed, which
        # the MTP module has not seen yet; `end` is the first position after them.
        self.draft_state = None
        # params.prompt_logprobs: entry p for prompt token p, filled by position as its chunks run (engine/prompt_logprobs)
        self.prompt_logprobs: list[dict[int, float] | None] | None = \
            [None] * self.num_prompt_tokens if params.prompt_logprobs is not None else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to compute before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def can_draft(self) -> bool:
        """Whether the drafter can propose this sequence's next tokens: it is decoding, and the drafter saw the
        target's hidden states up to its last computed token (not so after a KV import or a preemption)."""
        st = self.draft_state
        return st is not None and st.end == self.num_computed_tokens and self.num_pending_tokens == 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether its prompt positions still need logits: asked, and no output yet (a resumed or handed-off
        request had its prompt logprobs sent by the rank that produced its first token)."""
        return self.prompt_logprobs is not None and self.num_output_tokens == 0

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
