"""Runs one scheduled step on the model: owns the model, the paged KV cache tensors and the sampler.

Turns a `SchedulerOutput` into a `ForwardBatch` (flattened token ids, positions, block tables,
cache slots), runs the forward over every token of the step at once (so each MoE layer runs
once per step), and samples a next token for each sequence whose chunk reached its end.
"""
from __future__ import annotations

import hashlib
import time
from itertools import accumulate

import torch

from rayinfer.config import EngineConfig
from rayinfer.engine.overlap import balanced_split, microbatch, run_interleaved
from rayinfer.engine.sampler import Sampler
from rayinfer.engine.scheduler import SchedulerOutput
from rayinfer.kernels.mla import PAGE_SIZE
from rayinfer.model import DeepseekV3, ForwardBatch, load_model


def kv_bytes_per_token(model: DeepseekV3, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return cfg.num_hidden_layers * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


def kv_cache_pages(config: EngineConfig, model: DeepseekV3, max_model_len: int) -> int:
    """Pages of a rank's latent cache: `kv_cache_tokens`, or what `kv_cache_memory` holds, never more
    than `max_num_seqs` full-length sequences need."""
    cache = config.cache
    if cache.kv_cache_tokens is not None:
        tokens = cache.kv_cache_tokens
    else:
        tokens = min(cache.kv_cache_memory // kv_bytes_per_token(model, getattr(torch, config.dtype)),
                     config.scheduler.max_num_seqs * max_model_len)
    return max(1, -(-tokens // PAGE_SIZE))


class ModelRunner:
    def __init__(self, config: EngineConfig, model: DeepseekV3 | None = None, ctx=None):
        self.config = config
        self.dtype = getattr(torch, config.dtype)
        self.device = torch.device(config.device)
        self.model = model if model is not None else load_model(config.model, self.dtype, self.device)
        self.ctx = ctx  # expert-parallel context; None in a single-process engine
        cfg = self.model.cfg
        self.max_model_len = min(config.scheduler.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        self.num_blocks = kv_cache_pages(config, self.model, self.max_model_len)
        # Uninitialised on purpose: a page is always written before it is read, and untouched
        # pages cost no memory until used.
        self.kv_caches = [torch.empty(self.num_blocks, PAGE_SIZE, cfg.kv_cache_dim, dtype=self.dtype,
                                      device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = set(cfg.eos_token_id)
        self.sampler = Sampler(config.seed, self.device, self.eos_token_ids)
        self.checkpoint_path = self.model.checkpoint_path

    def _rows(self, seq, num_tokens: int) -> torch.Tensor:
        """Flat cache rows holding `seq`'s first `num_tokens` latents."""
        pos = torch.arange(num_tokens)
        return torch.tensor(seq.block_ids)[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE

    def export_kv(self, seq) -> torch.Tensor:
        """A copy of `seq`'s computed latents from every layer: [layers, tokens, D] (what a prefill rank hands off)."""
        rows = self._rows(seq, seq.num_computed_tokens).to(self.device)
        return torch.stack([c.view(-1, c.shape[-1])[rows] for c in self.kv_caches]).cpu()

    def import_kv(self, seq, latents: torch.Tensor) -> None:
        """Writes handed-off latents [layers, tokens, D] into `seq`'s (already allocated) pages."""
        assert latents.shape[0] == len(self.kv_caches) and latents.shape[2] == self.kv_caches[0].shape[-1]
        rows = self._rows(seq, latents.shape[1]).to(self.device)
        for cache, layer in zip(self.kv_caches, latents):
            cache.view(-1, cache.shape[-1])[rows] = layer.to(device=self.device, dtype=cache.dtype)

    def read_page(self, block_id: int) -> bytes:
        """One page of every layer as bytes, [layers, 64, D] row-major (what the disk tier stores)."""
        page = torch.stack([c[block_id] for c in self.kv_caches])  # [L, 64, D]
        return page.cpu().contiguous().view(torch.uint8).numpy().tobytes()

    def write_pages(self, block_ids: list[int], payloads: list[bytes]) -> None:
        """Puts pages read back from the disk tier into device pages `block_ids`."""
        c0 = self.kv_caches[0]
        for bid, payload in zip(block_ids, payloads):
            page = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(c0.dtype)
            page = page.view(len(self.kv_caches), *c0.shape[1:]).to(self.device)  # [L, 64, D]
            for cache, layer in zip(self.kv_caches, page):
                cache[bid] = layer

    def kv_fingerprint(self) -> str:
        """What decides a cached page's bytes: model config, weights, dtype and cache layout."""
        m = self.model
        probe = b"".join(t.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes()
                         for t in (m.embed_tokens.weight, m.lm_head.weight, m.norm.weight))
        return (f"rayinfer-kv-page v1; config={m.cfg!r}; dtype={self.dtype}; layers={len(self.kv_caches)}; "
                f"layout=[layers,{PAGE_SIZE},{self.kv_caches[0].shape[-1]}]; weights={hashlib.blake2b(probe).hexdigest()}")

    def prepare(self, items: list[tuple]) -> tuple[torch.Tensor, ForwardBatch]:
        """items: (sequence, first position, number of tokens) -> (token ids [T], ForwardBatch)."""
        dev = self.device
        if not items:  # an idle rank's share of a gang step
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return empty, ForwardBatch(empty, [], [], torch.zeros(0, 1, dtype=torch.long, device=dev), empty,
                                       self.kv_caches)
        ids, pos, slots = [], [], []
        width = max(len(seq.block_ids) for seq, _, _ in items)
        tables = torch.zeros(len(items), width, dtype=torch.long)
        for i, (seq, start, n) in enumerate(items):
            ids.extend(seq.token_ids[start:start + n])
            p = torch.arange(start, start + n)
            blocks = torch.tensor(seq.block_ids)
            tables[i, : len(seq.block_ids)] = blocks
            pos.append(p)
            slots.append(blocks[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE)
        batch = ForwardBatch(torch.cat(pos).to(dev), [n for _, _, n in items], [s + n for _, s, n in items],
                             tables.to(dev), torch.cat(slots).to(dev), self.kv_caches)
        return torch.tensor(ids, device=dev), batch

    def _parts(self, sched: SchedulerOutput) -> list[list[tuple]]:
        """The step's work as microbatches: one, or two of balanced attention load when overlapping."""
        items = [(s.seq, s.start, s.num_new_tokens) for s in sched.scheduled]
        if self.ctx is None or self.ctx.num_microbatches(sched.num_tokens) == 1:
            return [items]
        if len(items) == 1 and items[0][2] > 1:  # split a lone sequence by tokens
            seq, start, n = items[0]
            half = n // 2
            return [[(seq, start, half)], [(seq, start + half, n - half)]]
        first, second = balanced_split([n * (start + n) for _, start, n in items])
        return [[items[i] for i in first], [items[i] for i in second]]

    def _gather(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """hidden[rows] with the row numbers copied to the device once."""
        return hidden.index_select(0, torch.tensor(rows, dtype=torch.long).to(hidden.device))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, tuple[int, dict[int, float] | None]]:
        """Runs the step; returns request id -> (sampled token, logprobs) for sequences that sample.

        In a gang the forward runs even with nothing scheduled: the other ranks' MoE layers need
        this rank in their all-to-alls."""
        if not sched.scheduled and self.ctx is None:
            return {}
        rows, seqs = [], []
        if self.ctx is None:
            ids, batch = self.prepare([(s.seq, s.start, s.num_new_tokens) for s in sched.scheduled])
            hidden = self.model.hidden_states(ids, batch)
            ends = list(accumulate(batch.query_lens))  # host-side: no device sync for row numbers
            picked = [(ends[i] - 1, s.seq) for i, s in enumerate(sched.scheduled) if s.samples]
            rows = [self._gather(hidden, [r for r, _ in picked])] if picked else []
            seqs = [seq for _, seq in picked]
        else:
            t0 = time.perf_counter()
            parts = self._parts(sched)
            prepared = [self.prepare(p) for p in parts]
            gens = [microbatch(self.model, ids, b, self.ctx, self.ctx.decode_split) for ids, b in prepared]
            hiddens = run_interleaved(gens)
            self.ctx.load.end_step()
            self.ctx.tokens_computed += sched.num_tokens
            self.ctx.steps += 1
            self.ctx.step_s += time.perf_counter() - t0
            for part, (ids, b), hidden in zip(parts, prepared, hiddens):
                picked = [(end - 1, seq) for (seq, start, n), end in zip(part, accumulate(b.query_lens))
                          if start + n == seq.num_tokens]
                if picked:
                    rows.append(self._gather(hidden, [r for r, _ in picked]))
                    seqs += [seq for _, seq in picked]
        if not seqs:
            return {}
        tokens, logprobs = self.sampler(self.model.logits(torch.cat(rows)), seqs)
        return {seq.request_id: (t, lp) for seq, t, lp in zip(seqs, tokens, logprobs)}
