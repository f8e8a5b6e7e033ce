"""Runs one scheduled step on the model: owns the model, the paged KV cache tensors and the sampler.

Turns a `SchedulerOutput` into a `ForwardBatch` (flattened token ids, positions, block tables,
cache slots), runs the forward over every token of the step at once (so each MoE layer runs
once per step), and samples a next token for each sequence whose chunk reached its end.
"""
from __future__ import annotations

import torch

from rayinfer.config import EngineConfig
from rayinfer.engine.sampler import Sampler
from rayinfer.engine.scheduler import SchedulerOutput
from rayinfer.kernels.mla import PAGE_SIZE
from rayinfer.model import DeepseekV3, ForwardBatch, load_model


def kv_bytes_per_token(model: DeepseekV3, dtype: torch.dtype) -> int:
    cfg = model.cfg
    return cfg.num_hidden_layers * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


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
        cache = config.cache
        if cache.kv_cache_tokens is not None:
            tokens = cache.kv_cache_tokens
        else:
            tokens = min(cache.kv_cache_memory // kv_bytes_per_token(self.model, self.dtype),
                         config.scheduler.max_num_seqs * self.max_model_len)
        self.num_blocks = max(1, -(-tokens // PAGE_SIZE))
        # Uninitialised on purpose: a page is always written before it is read, and untouched
        # pages cost no memory until used.
        self.kv_caches = [torch.empty(self.num_blocks, PAGE_SIZE, cfg.kv_cache_dim, dtype=self.dtype,
                                      device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.sampler = Sampler(config.seed)
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = set(cfg.eos_token_id)
        self.checkpoint_path = self.model.checkpoint_path

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, ForwardBatch]:
        ids, pos, slots = [], [], []
        width = max(len(s.seq.block_ids) for s in sched.scheduled)
        tables = torch.zeros(len(sched.scheduled), width, dtype=torch.long)
        for i, s in enumerate(sched.scheduled):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            ids.extend(seq.token_ids[start:start + n])
            p = torch.arange(start, start + n)
            blocks = torch.tensor(seq.block_ids)
            tables[i, : len(seq.block_ids)] = blocks
            pos.append(p)
            slots.append(blocks[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE)
        dev = self.device
        batch = ForwardBatch(torch.cat(pos).to(dev), [s.num_new_tokens for s in sched.scheduled],
                             [s.start + s.num_new_tokens for s in sched.scheduled], tables.to(dev),
                             torch.cat(slots).to(dev), self.kv_caches)
        return torch.tensor(ids, device=dev), batch

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, tuple[int, dict[int, float] | None]]:
        """Runs the step; returns request id -> (sampled token, logprobs) for sequences that sample."""
        if not sched.scheduled:
            return {}
        ids, batch = self.prepare(sched)
        hidden = self.model.hidden_states(ids, batch, self.ctx)
        rows = [i for i, s in enumerate(sched.scheduled) if s.samples]
        if not rows:
            return {}
        last = batch.last_rows()[rows]
        logits = self.model.logits(hidden[last])
        seqs = [sched.scheduled[i].seq for i in rows]
        tokens, logprobs = self.sampler(logits, seqs)
        return {seq.request_id: (t, lp) for seq, t, lp in zip(seqs, tokens, logprobs)}
