"""The DeepSeek-V3/R1 transformer: decoder blocks, the model, and the MTP module.

Single-device semantics: a forward runs over one `ForwardBatch` of flattened tokens. Expert
parallelism enters only through the `ctx` argument (routing tokens to experts held elsewhere);
which experts this instance holds is fixed at construction (`local_experts`). The MTP module
(`model.layers.{num_hidden_layers}` in checkpoints) is built when the config declares it, to be
used for speculative decoding.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.config import ModelConfig
from rayinfer.model.batch import ForwardBatch
from rayinfer.model.layers import MLP, Embedding, Linear, RMSNorm
from rayinfer.model.mla import MLA
from rayinfer.model.moe import MoE
from rayinfer.model.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, moe: bool,
                 logical_ids: list[int] | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer_idx, logical_ids) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def stages(self, x: torch.Tensor, batch: ForwardBatch, ctx=None, decode_split: bool = False):
        """The block's forward as a generator returning the new residual stream [T, H].

        It yields where a microbatch can give way to another (`engine.overlap`): after launching the
        MoE dispatch and after launching its combine, and with `decode_split` between attention's
        projections (ATTN-0) and the rest (ATTN-1). Run straight through (`forward`), it is the plain
        forward; without a parallel context the experts are called locally and it never yields."""
        attn = self.self_attn
        cache = batch.kv_caches[self.layer_idx] if batch.kv_caches is not None else None
        h = self.input_layernorm(x)
        if decode_split:
            proj = attn.project(h, batch)
            yield  # ATTN-0 done
            x = x + attn.attend(proj, batch, cache)
        else:
            x = x + attn(h, batch, cache)
        h = self.post_attention_layernorm(x)
        moe = self.mlp
        if not isinstance(moe, MoE) or ctx is None:
            return x + moe(h)
        weights, idx = moe.gate(h)
        handle = ctx.dispatch_launch(moe.layer_idx, h, idx, weights)
        yield  # dispatch in flight
        shared = moe.shared(h)
        recv = ctx.dispatch_wait(handle)
        handle = ctx.combine_launch(moe.experts(recv.x, recv.slots, recv.weights), handle)
        yield  # combine in flight
        return x + (ctx.combine_wait(handle) + shared)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, ctx=None) -> torch.Tensor:
        stages = self.stages(x, batch, ctx)
        while True:
            try:
                next(stages)
            except StopIteration as done:
                return done.value


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size)


class MTPLayer(Block):
    """Predicts token t+2 from the main model's hidden state at t and the embedding of token t+1."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, logical_ids: list[int] | None):
        super().__init__(cfg, layer_idx, rotary, cfg.n_routed_experts > 0, logical_ids)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def predict(self, hidden: torch.Tensor, next_embeds: torch.Tensor, batch: ForwardBatch, ctx=None):
        """hidden, next_embeds [T, H] -> (logits [T, V], this module's hidden [T, H])."""
        x = self.propose(hidden, next_embeds, batch, ctx)
        return self.head(x), x

    def propose(self, hidden: torch.Tensor, next_embeds: torch.Tensor, batch: ForwardBatch, ctx=None) -> torch.Tensor:
        """hidden, next_embeds [T, H] -> this module's hidden [T, H] (its KV written), without the head: a drafter
        needs the logits of one row per sequence, not of every row it catches up on."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        return super().forward(x, batch, ctx)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """This module's hidden [T, H] -> logits [T, V] for the token two positions on."""
        return self.shared_head.head(self.shared_head.norm(x))


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig, local_experts: dict[int, list[int]] | None = None):
        """`local_experts`: MoE layer index -> logical expert held in each local slot (default: all, in order)."""
        super().__init__()
        self.cfg = cfg
        local_experts = local_experts or {}
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.rope_interleave)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, self.rotary, cfg.is_moe_layer(i), local_experts.get(i))
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPLayer(cfg, n + k, self.rotary, local_experts.get(n + k)) for k in range(cfg.num_nextn_predict_layers))

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in [*self.layers, *self.mtp] if isinstance(b.mlp, MoE)]

    def hidden_states(self, ids: torch.Tensor, batch: ForwardBatch, ctx=None) -> torch.Tensor:
        """ids [T] -> final hidden states [T, H] before the last norm."""
        x = self.embed_tokens(ids)
        for block in self.layers:
            x = block(x, batch, ctx)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch | None = None, ctx=None) -> torch.Tensor:
        """input_ids [B, T] (full sequences, no cache) -> logits [B, T, V]; or [T] with a batch -> [T, V]."""
        if input_ids.dim() == 2:
            b, t = input_ids.shape
            batch = batch or ForwardBatch.dense(b, t, input_ids.device)
            return self.logits(self.hidden_states(input_ids.reshape(-1), batch, ctx)).view(b, t, -1)
        assert batch is not None, "a flat [T] input needs a ForwardBatch"
        return self.logits(self.hidden_states(input_ids, batch, ctx))
