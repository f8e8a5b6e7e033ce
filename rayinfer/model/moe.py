"""Mixture-of-experts: the routing gate, the routed experts a model instance holds, the MoE layer.

Gate (noaux_tc): sigmoid scores; `e_score_correction_bias` is added for expert *selection* only;
group score = sum of each group's top-2 biased scores; the top `topk_group` groups stay eligible;
weights are the unbiased scores of the chosen experts, normalised and scaled by
`routed_scaling_factor`. A model instance may hold only some experts: `RoutedExperts` owns a
list of slots, each holding one logical expert's weights. Which slot a token goes to, and how it
gets there (local call or all-to-all), is decided by the parallel context the block runs with.
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer.config import ModelConfig
from rayinfer.kernels.moe import sorted_ffn
from rayinfer.model.layers import MLP


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        bias = torch.empty(cfg.n_routed_experts) if cfg.topk_method == "noaux_tc" else None
        self.e_score_correction_bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K] fp32, logical expert ids [T, K])."""
        cfg = self.cfg
        logits = torch.nn.functional.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            grouped = choice.view(x.shape[0], cfg.n_group, cfg.n_routed_experts // cfg.n_group)  # [T, G, E/G]
            if self.e_score_correction_bias is not None:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K]
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx


class RoutedExperts(nn.Module):
    """Expert weights stacked by local slot: w13 [S, 2I, H] (gate rows, then up rows), w2 [S, H, I]."""

    def __init__(self, cfg: ModelConfig, logical_ids: list[int]):
        super().__init__()
        s, h, i = len(logical_ids), cfg.hidden_size, cfg.moe_intermediate_size
        self.logical_ids = list(logical_ids)
        self.w13 = nn.Parameter(torch.empty(s, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(s, h, i))
        # FP8 block scales when the weights are kept in FP8: w13_scale [S, 2I/128, H/128], w2_scale
        # [S, H/128, I/128]. Buffers, so they move with the weights (`to_empty`, EPLB slot copies).
        self.register_buffer("w13_scale", None, persistent=False)
        self.register_buffer("w2_scale", None, persistent=False)

    @property
    def num_slots(self) -> int:
        return len(self.logical_ids)

    def forward(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                all_local: bool = False) -> torch.Tensor:
        """x [N, H]; slots [N, K] local slot per choice (-1: not here); weights [N, K] -> weighted sum [N, H].

        Routing stays on the device: every (token, choice) pair is sorted by slot, choices served
        elsewhere sorting last as slot S, and each slot's end row found by a search over the sorted
        keys; no host read, and the same operations whatever the number of tokens or slots. The
        weights scale each pair's activation (fp32 math); the K outputs of a token are summed with
        fp32 accumulation and rounded once, as transformers does. `all_local`: the caller knows no
        choice is served elsewhere (a single-rank model), so no row needs masking."""
        n, k = slots.shape
        s = self.num_slots
        flat = slots.reshape(-1)
        key, order = torch.where(flat >= 0, flat, s).sort(stable=True)  # [N*K] pairs in slot order
        offs = torch.searchsorted(key, torch.arange(s, device=x.device), right=True).to(torch.int32)  # [S]
        y = sorted_ffn(x[order // k], offs, self.w13, self.w2, self.w13_scale, self.w2_scale,
                       row_weights=weights.reshape(-1)[order].float())  # [N*K, H]
        if not all_local:  # rows of choices served elsewhere are unspecified (maybe NaN): zeroed, not weighted
            y = y.masked_fill((key >= s).unsqueeze(1), 0.0)
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=x.device))
        return y.index_select(0, unsort).view(n, k, y.shape[1]).sum(dim=1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, logical_ids: list[int] | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        ids = list(range(cfg.n_routed_experts)) if logical_ids is None else logical_ids
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg, ids)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, shared) if shared else None

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] with every expert local (slot == logical id). Expert parallelism runs the
        same parts through a parallel context instead (`Block.stages`)."""
        assert self.experts.logical_ids == list(range(self.gate.weight.shape[0])), \
            "this model holds a subset of experts: pass the parallel context that reaches the others"
        weights, idx = self.gate(x)
        return self.experts(x, idx, weights, all_local=True) + self.shared(x)
