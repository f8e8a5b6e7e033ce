"""Runs one scheduled step on the model: owns the model, the paged KV cache tensors and the sampler.

Turns a `SchedulerOutput` into a `ForwardBatch` (flattened token ids, positions, block tables,
cache slots), runs the forward over every token of the step at once (so each MoE layer runs
once per step), and samples a next token for each sequence whose chunk reached its end. Decode-only
steps replay from per-bucket graphs where `cuda_graphs` allows (one rank, CUDA, not `enforce_eager`). With
`num_speculative_tokens` a single-rank step runs through `drafter.MtpDrafter` instead (drafts, one verifying forward).
"""
from __future__ import annotations

import hashlib
import logging
import time

import torch

from rayinfer.config import EngineConfig
from rayinfer.engine.cuda_graphs import CudaGraphCapture, DecodeGraphs, graphs_blocker
from rayinfer.engine.decode_buckets import bucket_sizes, is_decode_step, pad_decode
from rayinfer.engine import prompt_logprobs
from rayinfer.engine.overlap import balanced_split, microbatch, run_interleaved
from rayinfer.engine.sampler import Sampler
from rayinfer.engine.scheduler import SchedulerOutput
from rayinfer.kernels.mla import PAGE_SIZE
from rayinfer.messages import RequestFailed
from rayinfer.model import DeepseekV3, ForwardBatch, load_model
from rayinfer.kernels.transfer import to_device

log = logging.getLogger(__name__)


def kv_bytes_per_token(model: DeepseekV3, dtype: torch.dtype) -> int:
    """Every layer's latent, and the MTP module's where it is loaded (the drafter runs module 0)."""
    cfg = model.cfg
    layers = cfg.num_hidden_layers + min(len(model.mtp), 1)
    return layers * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


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
        # Drafts only where sequences decode: a prefill rank hands each one off after its first token.
        spec = config.speculative.num_speculative_tokens if config.scheduler.mode != "prefill" else 0
        self.model = model if model is not None else load_model(config.model, self.dtype, self.device, mtp=spec > 0)
        self.ctx = ctx  # expert-parallel context; None in a single-process engine
        cfg = self.model.cfg
        self.max_model_len = min(config.scheduler.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        self.num_blocks = kv_cache_pages(config, self.model, self.max_model_len)
        # Uninitialised on purpose: a page is always written before it is read, and untouched
        # pages cost no memory until used. One page more than the block manager hands out: the
        # scratch page of the dummy sequences that pad a decode step to its bucket.
        self.scratch_page = self.num_blocks
        self.kv_caches = [torch.empty(self.num_blocks + 1, PAGE_SIZE, cfg.kv_cache_dim, dtype=self.dtype,
                                      device=self.device) for _ in range(cfg.num_hidden_layers)]
        # Decode-only steps of a single-rank CUDA engine replay from graphs over padded buckets (see cuda_graphs).
        self.decode_buckets = self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and not spec:  # verify steps are not graphed yet
            self.use_graphs(CudaGraphCapture())
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = set(cfg.eos_token_id)
        self.sampler = Sampler(config.seed, self.device, self.eos_token_ids)
        # Test hook: a predicate on a sequence; a sampling call whose rows hold one it picks raises, as an
        # out-of-range token id in the sampler would (see `_sample`).
        self.fault = None
        self.checkpoint_path = self.model.checkpoint_path
        self.drafter, self.num_speculative_tokens = None, spec  # the scheduler gives decoding sequences `spec` drafts
        if spec:
            from rayinfer.engine.drafter import MtpDrafter

            self.drafter = MtpDrafter(self, spec)

    def use_graphs(self, capture) -> str | None:
        """Replays decode-only steps through `capture` (CUDA graphs, or a CPU stand-in); returns why not, if not."""
        reason = graphs_blocker(self.model, self.ctx) or capture.blocker(self.model, self.kv_caches[0])
        if reason is not None:
            log.info("decode runs eagerly: %s", reason)
            return reason
        self.decode_buckets = bucket_sizes(self.config.scheduler.max_num_seqs)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.decode_buckets, self.max_model_len, self.device,
                                   capture)
        return None

    def _decode_graphed(self, items: list[tuple]) -> torch.Tensor | None:
        """A decode-only step replayed from its bucket's graph -> hidden states, row i of item i; None: run eagerly."""
        if self.graphs is None or not is_decode_step(items):
            return None
        try:
            return self.graphs.run(pad_decode(items, self.decode_buckets, self.scratch_page))
        except NotImplementedError as e:  # a kernel's per-step metadata cannot live outside the graph
            log.warning("decode graphs off: %s", e)
            self.graphs = self.decode_buckets = None
            return None

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
        return (f"rayinfer-kv-page v2; config={m.cfg!r}; dtype={self.dtype}; layers={len(self.kv_caches)}; "
                f"layout=[layers,{PAGE_SIZE},{self.kv_caches[0].shape[-1]}]; weights={weights_digest(m)}")

    def prepare(self, items: list[tuple]) -> tuple[torch.Tensor, ForwardBatch]:
        """items: (sequence, first position, number of tokens[, their token ids]) -> (token ids [T], ForwardBatch).
        Token ids default to the sequence's own; speculative drafts, not in them yet, are given."""
        dev = self.device
        if not items:  # an idle rank's share of a gang step
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return empty, ForwardBatch(empty, [], [], torch.zeros(0, 1, dtype=torch.long, device=dev), empty,
                                       self.kv_caches)
        ids, pos, slots = [], [], []
        width = max(len(item[0].block_ids) for item in items)
        tables = torch.zeros(len(items), width, dtype=torch.long)  # [B, max_pages], built on the host
        for i, (seq, start, n, *given) in enumerate(items):
            ids.extend(given[0] if given else seq.token_ids[start:start + n])
            p = torch.arange(start, start + n)
            blocks = torch.tensor(seq.block_ids)
            tables[i, : len(seq.block_ids)] = blocks
            pos.append(p)
            slots.append(blocks[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE)
        batch = ForwardBatch(to_device(torch.cat(pos), dev), [it[2] for it in items], [it[1] + it[2] for it in items],
                             to_device(tables, dev), to_device(torch.cat(slots), dev), self.kv_caches)
        return to_device(torch.tensor(ids), dev), batch

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

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, tuple[int, dict[int, float] | None]]:
        """Runs the step; returns request id -> (sampled token, logprobs) for sequences that sample.

        In a gang the forward runs even with nothing scheduled: the other ranks' MoE layers need
        this rank in their all-to-alls."""
        if not sched.scheduled and self.ctx is None:
            return {}
        if self.drafter is not None:
            return self.drafter.execute(sched)
        rows, seqs = [], []
        if self.ctx is None:
            items = [(s.seq, s.start, s.num_new_tokens) for s in sched.scheduled]
            graphed = self._decode_graphed(items)
            if graphed is not None:
                hiddens, ends = [graphed], range(len(items))
            else:
                if self.decode_buckets is not None and is_decode_step(items):
                    items = pad_decode(items, self.decode_buckets, self.scratch_page)
                ids, batch = self.prepare(items)
                hiddens = [self.model.hidden_states(ids, batch)]
                ends = batch.last_rows()
            for i, s in enumerate(sched.scheduled):
                if s.samples:
                    rows.append(ends[i])
                    seqs.append(s.seq)
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
            offset = 0  # rows of the parts' hidden states, concatenated
            for part, (ids, b), h in zip(parts, prepared, hiddens):
                for (seq, start, n), end in zip(part, b.last_rows() if part else []):
                    if start + n == seq.num_tokens:
                        rows.append(offset + end)
                        seqs.append(seq)
                offset += h.shape[0]
        if any(s.seq.needs_prompt_logprobs for s in sched.scheduled):  # all prompt rows' logits, for those asking
            prompt_logprobs.record(self.model, [(items, hiddens[0])] if self.ctx is None else zip(parts, hiddens))
        if not seqs:
            return {}
        # One gather of the sampling rows, whatever the batch size.
        picked = torch.cat(hiddens)[to_device(torch.tensor(rows), self.device)]  # [B, H]
        return self._sample(self.model.logits(picked), seqs)

    def _sample(self, logits: torch.Tensor, seqs: list) -> dict:
        """One sampling call for the batch; if it raises, one call per row, so that a row that fails fails
        alone (as a `RequestFailed` in its place). Sampling runs after the gang's collectives: no peer waits
        on it. (A CUDA device-side assert is beyond this: it poisons the context; the engine's and the
        ingress's checks of every token id are what keep one from being reached.)"""
        try:
            tokens, logprobs = self._sample_rows(logits, seqs)
            return {seq.request_id: (t, lp) for seq, t, lp in zip(seqs, tokens, logprobs)}
        except Exception:  # noqa: BLE001 - find the rows it failed for (a lone row: that one)
            pass
        out = {}
        for i, seq in enumerate(seqs):
            try:
                (t,), (lp,) = self._sample_rows(logits[i:i + 1], [seq])
                out[seq.request_id] = (t, lp)
            except Exception as e:  # noqa: BLE001 - this row's own failure
                out[seq.request_id] = RequestFailed(f"request {seq.request_id!r} failed in sampling: "
                                                    f"{type(e).__name__}: {e}")
        return out

    def _sample_rows(self, logits: torch.Tensor, seqs: list) -> tuple[list, list]:
        if self.fault is not None and any(self.fault(s) for s in seqs):
            raise IndexError("injected sampling fault (ModelRunner.fault)")
        return self.sampler(logits, seqs)


def weights_digest(model: DeepseekV3, per_tensor: int = 4096) -> str:
    """A digest of the weights every rank holds alike: each tensor's name, shape and dtype, and `per_tensor`
    elements strided over the whole of it (all of a smaller one). A fine-tune changes nearly every element of
    the tensors it touches, so any tuned layer changes the digest; an edit of a few elements between the
    samples would not. Routed experts are left out: each rank holds other ones (and the disk tier is shared
    by every rank of every gang), while the attention, norms, gates and shared experts that tuning also moves
    are in every rank. Cost at load: one strided gather and host copy per tensor, ~16 KiB each (about 1,500
    tensors, ~25 MB hashed, for DeepSeek-V3), whatever the model's size."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.named_parameters()):
        if name.endswith((".experts.w13", ".experts.w2")):
            continue
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // per_tensor)][:per_tensor]  # [<= per_tensor], first to last
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(sample.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
