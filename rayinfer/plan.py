"""Capacity planning: what every rank of a serve config will hold, before any GPU is rented.

Owns the per-role figures `rayinfer plan` prints: ranks, routed-expert slots per rank, weight bytes of the
largest rank, its paged latent cache (bytes and tokens), an activation estimate, and whether that fits a
GPU's memory. Crosses: a `ServeConfig` (config.json only; no weights needed) in, `RolePlan` rows out.
The weights are counted on a model built by the loader's own `rank_model` on `meta`, so the plan and
the load cannot disagree; nothing is allocated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rayinfer.balance.placement import ExpertPlacement
from rayinfer.config import ModelConfig, ServeConfig
from rayinfer.engine.model_runner import kv_bytes_per_token, kv_cache_pages
from rayinfer.kernels.mla import PAGE_SIZE
from rayinfer.model.build import weight_bytes
from rayinfer.model.loader import rank_model

# CUDA context, NCCL/DeepEP buffers, allocator slack and kernel workspaces: a flat allowance per GPU rank.
RUNTIME_OVERHEAD = 2 * 2**30


@dataclass(frozen=True)
class RolePlan:
    role: str
    ranks: int  # ep_size x num_gangs
    ep_size: int
    expert_slots_per_rank: int
    weight_bytes_per_rank: int
    kv_bytes_per_rank: int
    kv_tokens_per_rank: int
    activation_bytes: int  # estimate at the role's largest step, plus RUNTIME_OVERHEAD
    gpu_memory: int | None
    fits: bool | None  # None when no GPU memory was given or found

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes_per_rank + self.kv_bytes_per_rank + self.activation_bytes


def activation_bytes(cfg: ModelConfig, tokens: int, rows: int, itemsize: int) -> int:
    """A step's largest live activations: per token the residual, normed input and K top-k dispatch copies of
    the hidden state, all heads' queries/keys/values, the experts' gate/up outputs; fp32 logits per sampled row."""
    k = cfg.num_experts_per_tok
    per_token = (cfg.hidden_size * (2 + k) + cfg.num_attention_heads * (2 * cfg.qk_head_dim + cfg.v_head_dim)
                 + 2 * cfg.moe_intermediate_size * k)
    return tokens * per_token * itemsize + rows * cfg.vocab_size * 4 + RUNTIME_OVERHEAD


def plan(serve: ServeConfig, gpu_memory: int | None = None) -> list[RolePlan]:
    from rayinfer.model.presets import resolve_model_path

    path = resolve_model_path(serve.model)
    cfg = ModelConfig.from_file(path)
    dtype = getattr(torch, serve.dtype)
    if gpu_memory is None and serve.device.startswith("cuda") and torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    out = []
    for role in serve.roles:
        r, engine = serve.role(role), serve.engine_config(role)
        placement = ExpertPlacement.initial(cfg.moe_layers, cfg.n_routed_experts, r.num_redundant_experts, r.ep_size)
        # Every rank holds slots_per_rank slots and the same replicated weights, so rank 0 is the largest.
        drafts = role != "prefill" and engine.speculative.num_speculative_tokens > 0  # the MTP module and its cache
        model = rank_model(path, dtype, serve.device, placement.local_experts(0), mtp=drafts)
        max_len = min(engine.scheduler.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        tokens = kv_cache_pages(engine, model, max_len) * PAGE_SIZE
        kv = tokens * kv_bytes_per_token(model, dtype)
        step_tokens = r.max_num_seqs if role == "decode" else r.max_num_batched_tokens
        act = activation_bytes(cfg, step_tokens, r.max_num_seqs, dtype.itemsize)
        row = RolePlan(role, r.ep_size * r.num_gangs, r.ep_size, placement.slots_per_rank, weight_bytes(model),
                       kv, tokens, act, gpu_memory, None)
        out.append(dataclasses.replace(row, fits=None if gpu_memory is None else row.total_bytes <= gpu_memory))
    return out


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.1f} GB"


def format_table(rows: list[RolePlan]) -> str:
    head = ("role", "ranks", "slots/rank", "weights/rank", "kv/rank", "kv tokens/rank", "activations", "total",
            "gpu memory", "fits")
    body = [(p.role, str(p.ranks), str(p.expert_slots_per_rank), _gb(p.weight_bytes_per_rank), _gb(p.kv_bytes_per_rank),
             f"{p.kv_tokens_per_rank:,}", _gb(p.activation_bytes), _gb(p.total_bytes), _gb(p.gpu_memory),
             "-" if p.fits is None else "yes" if p.fits else "NO") for p in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body])


def as_json(rows: list[RolePlan]) -> list[dict]:
    return [dict(dataclasses.asdict(p), total_bytes=p.total_bytes) for p in rows]
