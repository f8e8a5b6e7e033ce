"""The model's input contract for one forward step: ragged sequences flattened into rows.

Sequence i owns rows [query_start[i], query_start[i+1]) of the step's tokens: its `query_lens[i]`
new tokens, which sit at the end of a context of `context_lens[i]` tokens. With a paged cache
(`kv_caches`, one [pages, 64, D] tensor per layer), new tokens' latents are written to
`slot_mapping` rows and earlier context is read through `block_tables`. Without a cache every
sequence is self-contained (query_len == context_len). The engine builds one per step; the
grouping of sequences into attention paths is derived here once, not once per layer: prefill
sequences either grouped by equal (query_len, context_len) for batched SDPA ("grouped", the CPU
path), or flattened for one varlen attention call per layer (`kernels.prefill`: "triton" on CUDA
once its probe passed; "torch" one padded SDPA), with their query rows and context rows. Index tensors
are built on the host and reach a CUDA device through pinned memory with non-blocking copies: a
plain copy from pageable memory would wait for every kernel already queued.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rayinfer.kernels import PAGE_SIZE, prefill
from rayinfer.kernels.transfer import to_device


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] int64
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor | None = None  # [B, max_pages] int64
    slot_mapping: torch.Tensor | None = None  # [T] int64, page * 64 + offset
    kv_caches: list[torch.Tensor] | None = None  # per layer [pages, 64, kv_cache_dim]
    # "grouped" | "torch" | "triton"; None picks by device (tests force the kernel on CPU under the interpreter)
    prefill_attention: str | None = None
    # Derived once per step:
    decode_rows: torch.Tensor | None = field(default=None, init=False)  # [Bd] row of each decode sequence
    decode_seqs: list[int] = field(default_factory=list, init=False)
    decode_lens: torch.Tensor | None = field(default=None, init=False)  # [Bd] context length of each
    decode_tables: torch.Tensor | None = field(default=None, init=False)  # [Bd, max_pages] their block tables
    prefill_groups: list["PrefillGroup"] = field(default_factory=list, init=False)  # "grouped" only
    prefill_varlen: prefill.Varlen | None = field(default=None, init=False)  # the rest: all prefills, flattened
    prefill_rows: torch.Tensor | None = field(default=None, init=False)  # [Tq] their rows of the step's tokens
    prefill_ctx_rows: torch.Tensor | None = field(default=None, init=False)  # [Tk] context rows: cache or step
    # Per-step kernel metadata every layer shares (FlashMLA's schedule): built by the first layer, rebuilt
    # outside a captured graph before each replay.
    step_cache: dict = field(default_factory=dict, init=False)
    # Tensors the forward derives from the step's inputs once and every layer reuses (rope cos/sin, the
    # reference decode's gather rows): built by the first layer; a capture must record them, so they are
    # cleared before each forward a graph captures.
    derived: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        assert len(self.query_lens) == len(self.context_lens)
        starts, s = [], 0
        for q in self.query_lens:
            starts.append(s)
            s += q
        assert s == self.positions.shape[0], "positions must cover every query row"
        self.num_tokens = s
        self.num_positions = max(self.context_lens, default=0)  # positions < this: sizes rope tables without a read
        cached = self.kv_caches is not None
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (q, c) in enumerate(zip(self.query_lens, self.context_lens)):
            assert q <= c and (cached or q == c), f"sequence {i}: query {q} vs context {c}"
            if q == 0:
                continue
            if cached and q == 1:
                self.decode_seqs.append(i)
            else:
                by_shape.setdefault((q, c), []).append(i)
        dev = self.positions.device
        if self.decode_seqs:
            self.decode_rows = to_device(torch.tensor([starts[i] for i in self.decode_seqs]), dev)
            self.decode_lens = to_device(torch.tensor([self.context_lens[i] for i in self.decode_seqs]), dev)
            self.decode_tables = self.block_tables[to_device(torch.tensor(self.decode_seqs), dev)]
        if self.prefill_attention is None:
            self.prefill_attention = prefill.default_backend(dev) or "grouped"
        assert self.prefill_attention in ("grouped", *prefill.BACKENDS), self.prefill_attention
        if self.prefill_attention != "grouped":
            self._flatten_prefills(sorted(i for seqs in by_shape.values() for i in seqs), starts)
            return
        for (q, c), seqs in by_shape.items():
            rows = to_device(torch.tensor([[starts[i] + j for j in range(q)] for i in seqs]), dev)  # [G, q]
            ctx_rows = None
            if cached:
                pos = torch.arange(c, device=dev)
                pages = self.block_tables[to_device(torch.tensor(seqs), dev)][:, pos // PAGE_SIZE]  # [G, c]
                ctx_rows = pages * PAGE_SIZE + pos % PAGE_SIZE
            self.prefill_groups.append(PrefillGroup(q, c, rows, ctx_rows))

    def _flatten_prefills(self, seqs: list[int], starts: list[int]) -> None:
        if not seqs:
            return
        dev = self.positions.device
        q_lens = [self.query_lens[i] for i in seqs]
        k_lens = [self.context_lens[i] for i in seqs]
        meta = prefill.Varlen.build(q_lens, k_lens, dev, with_blocks=self.prefill_attention == "triton")
        ql, kl = torch.tensor(q_lens), torch.tensor(k_lens)
        first_q = torch.tensor([starts[i] for i in seqs]) - (ql.cumsum(0) - ql)  # [Bp] row minus flat index
        self.prefill_rows = to_device(torch.arange(int(ql.sum())) + first_q.repeat_interleave(ql), dev)  # [Tq]
        self.prefill_varlen = meta
        if self.kv_caches is None:
            self.prefill_ctx_rows = self.prefill_rows  # self-contained: the context is the step's own rows
            return
        seq = torch.tensor(seqs).repeat_interleave(kl)  # [Tk] sequence of each context row
        pos = torch.arange(int(kl.sum())) - (kl.cumsum(0) - kl).repeat_interleave(kl)  # [Tk] its position
        seq, pos = to_device(seq, dev), to_device(pos, dev)
        self.prefill_ctx_rows = self.block_tables[seq, pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE

    @staticmethod
    def dense(batch: int, length: int, device="cpu") -> "ForwardBatch":
        """B equal-length sequences, no cache: the full-sequence forward."""
        pos = torch.arange(length, device=device).repeat(batch)
        return ForwardBatch(pos, [length] * batch, [length] * batch)

    def last_rows(self) -> list[int]:
        """Row of each sequence's last new token (where its next-token logits come from), known on the host."""
        ends, s = [], 0
        for q in self.query_lens:
            s += q
            ends.append(s - 1)
        return ends


@dataclass
class PrefillGroup:
    """Sequences with the same (query_len, context_len), attended together by the naive path."""

    query_len: int
    context_len: int
    rows: torch.Tensor  # [G, q] rows of the step's tokens
    ctx_rows: torch.Tensor | None  # [G, c] flat cache rows of the whole context, when cached
