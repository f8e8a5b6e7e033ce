"""Multi-head latent attention (MLA), with its two equivalent paths.

Only the normalised KV latent (kv_lora_rank) and the rope key (qk_rope_head_dim) are cached per
token. The naive path (prefill) up-projects the whole context's latents to per-head keys and
values and runs ordinary causal attention. The absorbed path (decode) folds the key up-projection
into the query and the value up-projection into the output, so it attends directly over cached
latents (`kernels.mla.mla_decode`). Both give the same result; tests hold them to it. The naive
path runs per group of equal-shaped sequences, or (`_varlen`) once per layer over every prefill
sequence of the step: one gather of their context latents, one up-projection, one
`kernels.prefill.varlen_prefill` call, values at their own width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayinfer.config import ModelConfig
from rayinfer.kernels.mla import mla_decode
from rayinfer.kernels.prefill import varlen_prefill
from rayinfer.model.batch import ForwardBatch, PrefillGroup
from rayinfer.model.layers import Linear, RMSNorm
from rayinfer.model.rope import RotaryEmbedding


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.h, self.nope, self.rope_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.r, self.v = cfg.kv_lora_rank, cfg.v_head_dim
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.h * qk)
        else:
            self.q_proj = Linear(cfg.hidden_size, self.h * qk)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.r + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.r, self.h * (self.nope + self.v))
        self.o_proj = Linear(self.h * self.v, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale
        self.rotary = [rotary]  # shared by all layers; a list keeps it out of this module's state
        self._absorb: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor | None) -> torch.Tensor:
        """x [T, H] -> [T, H]; writes the new tokens' latents into `kv_cache` when given."""
        return self.attend(self.project(x, batch), batch, kv_cache)

    def project(self, x: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ATTN-0: down/up projections and rope -> (q_nope [T, h, nope], q_pe [T, h, dr], latent [T, r+dr])."""
        t = x.shape[0]
        rope = self.rotary[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, self.h, self.nope + self.rope_dim).split([self.nope, self.rope_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.rope_dim], dim=-1)
        k_pe = rope(k_pe.unsqueeze(1), batch.positions, batch.num_positions, batch.derived).squeeze(1)
        q_pe = rope(q_pe, batch.positions, batch.num_positions, batch.derived)
        return q_nope, q_pe, torch.cat([self.kv_a_layernorm(c), k_pe], dim=-1)

    def attend(self, proj, batch: ForwardBatch, kv_cache: torch.Tensor | None) -> torch.Tensor:
        """ATTN-1: cache write, core attention over the context, output projection -> [T, H]."""
        q_nope, q_pe, latent = proj
        t = latent.shape[0]
        if kv_cache is not None and t:
            kv_cache.view(-1, latent.shape[-1])[batch.slot_mapping] = latent.to(kv_cache.dtype)
        if batch.decode_seqs and len(batch.decode_seqs) == t:  # a decode-only step: rows 0..t-1, in order
            return self.o_proj(self._absorbed(batch, q_nope, q_pe, kv_cache).reshape(t, self.h * self.v))
        out = latent.new_empty(t, self.h, self.v)
        for group in batch.prefill_groups:
            self._naive(group, q_nope, q_pe, latent, kv_cache, out)
        if batch.prefill_varlen is not None:
            self._varlen(batch, q_nope, q_pe, latent, kv_cache, out)
        if batch.decode_seqs:
            rows = batch.decode_rows
            out[rows] = self._absorbed(batch, q_nope[rows], q_pe[rows], kv_cache)
        return self.o_proj(out.view(t, self.h * self.v))

    def _naive(self, g: PrefillGroup, q_nope, q_pe, latent, kv_cache, out) -> None:
        ctx = latent[g.rows] if g.ctx_rows is None else kv_cache.view(-1, latent.shape[-1])[g.ctx_rows]  # [G, c, D]
        k, v = self._up_project(ctx.to(latent.dtype))  # [G, c, h, *]
        q = torch.cat([q_nope[g.rows], q_pe[g.rows]], dim=-1)  # [G, q, h, qk]
        qn, c = g.query_len, g.context_len
        mask = None
        if qn != c:  # queries are the last qn positions of the context
            mask = torch.ones(qn, c, dtype=torch.bool, device=q.device).tril(diagonal=c - qn)
        # Values padded to the key width: torch's fused attention kernels need equal head dims.
        v = F.pad(v, (0, q.shape[-1] - self.v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None, scale=self.scale)
        out[g.rows] = o.transpose(1, 2)[..., : self.v]

    def _up_project(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context rows [..., r+dr] -> (k [..., h, nope+dr], v [..., h, v]): per-head keys and values."""
        kv = self.kv_b_proj(ctx[..., : self.r]).view(*ctx.shape[:-1], self.h, self.nope + self.v)
        k_nope, v = kv.split([self.nope, self.v], dim=-1)
        k_pe = ctx[..., None, self.r:].expand(*ctx.shape[:-1], self.h, self.rope_dim)
        return torch.cat([k_nope, k_pe], dim=-1), v

    def _varlen(self, batch: ForwardBatch, q_nope, q_pe, latent, kv_cache, out) -> None:
        src = latent if kv_cache is None else kv_cache.view(-1, latent.shape[-1])
        k, v = self._up_project(src[batch.prefill_ctx_rows].to(latent.dtype))  # [Tk, h, qk], [Tk, h, v]
        rows = batch.prefill_rows
        q = torch.cat([q_nope[rows], q_pe[rows]], dim=-1)  # [Tq, h, qk]
        out[rows] = varlen_prefill(q, k, v, batch.prefill_varlen, self.scale, backend=batch.prefill_attention)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, nope, r], W_UV [h, v, r]): kv_b_proj split per head, dequantised once."""
        if self._absorb is None or self._absorb[0].dtype != dtype:
            w = self.kv_b_proj.dense_weight(dtype).view(self.h, self.nope + self.v, self.r)
            self._absorb = (w[:, : self.nope].contiguous(), w[:, self.nope:].contiguous())
        return self._absorb

    def _absorbed(self, batch: ForwardBatch, q_nope, q_pe, kv_cache) -> torch.Tensor:
        """The decode sequences' query rows q_nope [Bd, h, nope], q_pe [Bd, h, dr] -> attention output [Bd, h, v]."""
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [Bd, h, r]
        q = torch.cat([q_lat, q_pe], dim=-1).unsqueeze(1)  # [Bd, 1, h, D]
        o_lat = mla_decode(q.to(kv_cache.dtype), kv_cache, batch.decode_tables, batch.decode_lens, self.r,
                           self.scale, step_cache=batch.step_cache, derived=batch.derived)
        return torch.bmm(o_lat[:, 0].to(q_lat.dtype).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
