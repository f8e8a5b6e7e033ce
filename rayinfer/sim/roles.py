"""One simulated role: its gangs of `SimRank`s, their cost model, EPLB imbalance, load tracker and prefix index.

Owns `SimRole` and `expert_imbalance`. What crosses it: the role's `RoleConfig`, the model and hardware in;
the ranks, the role's share of the cluster's traffic (`fraction`) and each rank's `RankLoad` out to the
cluster loop (cluster.py), which routes and steps them.
"""
from __future__ import annotations

import torch

from rayinfer.balance.eplb import balancedness, rebalance_experts
from rayinfer.balance.policies import RankLoad
from rayinfer.balance.prefix_index import PrefixIndex
from rayinfer.balance.tracker import LoadTracker
from rayinfer.config import ModelConfig, ServeConfig
from rayinfer.sim.cost import CostModel
from rayinfer.sim.hardware import Hardware
from rayinfer.sim.rank import SimRank


def expert_imbalance(cfg: ModelConfig, slots: int, ep: int, gpus_per_node: int, sigma: float, seed: int) -> float:
    """Max over mean routed load per rank after EPLB places `slots` replicas of experts whose popularity is
    lognormal(0, sigma) (four sample layers, averaged)."""
    if ep == 1 or not cfg.n_routed_experts:
        return 1.0
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(4, cfg.n_routed_experts, generator=g, dtype=torch.float64) * sigma)
    nodes = max(1, ep // gpus_per_node) if ep % gpus_per_node == 0 else 1
    phy2log, _, logcnt = rebalance_experts(w, slots, cfg.n_group, nodes, ep)
    return float(balancedness(w, phy2log, logcnt, ep).mean())


class SimRole:
    def __init__(self, name: str, serve: ServeConfig, cfg: ModelConfig, hw: Hardware, opts, disk):
        rc = serve.role(name)
        self.name, self.rc, self.ep = name, rc, rc.ep_size
        self.num_gangs = rc.autoscaling.min_gangs if rc.autoscaling else rc.num_gangs
        if rc.autoscaling:
            self.num_gangs = max(self.num_gangs, min(rc.num_gangs, rc.autoscaling.max_gangs))
        total = self.ep * self.num_gangs
        sampled = rc.autoscaling is not None or total > opts.max_exact_ranks
        per_gang = min(self.ep, opts.sample_ranks) if sampled else self.ep
        sim_gangs = 1 if sampled else self.num_gangs
        slots = (cfg.n_routed_experts + rc.num_redundant_experts) if cfg.n_routed_experts else 0
        if slots % self.ep:
            raise ValueError(f"{name}: {slots} expert slots do not divide over ep_size={self.ep}")
        self.imbalance = expert_imbalance(cfg, slots, self.ep, hw.gpus_per_node, opts.expert_sigma, opts.seed)
        self.cost = CostModel(cfg, hw, self.ep, slots / self.ep if slots else 0, self.imbalance,
                              overlap=rc.enable_overlap, low_latency=name == "decode" and self.ep > hw.gpus_per_node)
        kv_mem = rc.kv_cache_memory or (None if hw.memory_bytes else serve.kv_cache_memory)
        self.kv_tokens = self.cost.kv_capacity_tokens(kv_mem)
        self.gangs = [[SimRank(f"{name}{g}.{r}", name, self.kv_tokens, rc.max_num_seqs, rc.max_num_batched_tokens,
                               cfg.max_position_embeddings, disk if name != "decode" else None)
                       for r in range(per_gang)] for g in range(sim_gangs)]
        self.ranks = [r for gang in self.gangs for r in gang]
        self.by_id = {r.id: r for r in self.ranks}
        self.busy = [False] * sim_gangs
        self.tracker = LoadTracker("prefill" if name == "prefill" else "decode")
        self.index = PrefixIndex() if name != "decode" else None
        self.ongoing: list[tuple[float, float]] = []  # (time, requests per rank) for the autoscaler
        self.pending_scale: tuple[int, float] | None = None  # (desired gangs, since when)

    @property
    def fraction(self) -> float:
        """Share of the role's traffic the simulated ranks receive."""
        return len(self.ranks) / (self.num_gangs * self.ep)

    def load(self, rank: SimRank) -> RankLoad:
        s = rank.engine.scheduler
        prefill_tokens, attention = 0, 0.0
        for seq in (*s.running, *s.waiting):
            left = max(0, seq.num_prompt_tokens - seq.num_computed_tokens)
            prefill_tokens += left
            attention += left * (seq.num_computed_tokens + (left + 1) / 2)
        bm = rank.engine.block_manager
        n = len(s.running) + len(s.waiting) + (len(rank.engine.disk.loading) if rank.engine.disk else 0)
        return RankLoad(n, prefill_tokens, attention, bm.num_allocated_blocks() * bm.block_size,
                        bm.num_blocks * bm.block_size, self.rc.max_num_seqs)
