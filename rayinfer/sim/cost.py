"""How long one gang step takes: a per-kernel cost model over the real config's shapes (pure Python).

Owns the step-time arithmetic. What crosses it: the batches the real scheduler built on each simulated
rank (`RankBatch`, from `SchedulerOutput`), a `ModelConfig`, a `Hardware` profile and the gang's expert
imbalance (from the EPLB placement); out comes seconds and a breakdown.

Per layer and rank: GEMMs (attention projections, dense MLP, shared and routed experts, gate) each
max(flops / achievable FLOPS, bytes / achievable bandwidth) + a launch overhead; core MLA attention
(decode: the paged KV bytes read, absorbed form; prefill: FLOPs of the causal pairs); dispatch and
combine (bytes per rank: DeepEP low-latency kernels for decode, normal kernels for prefill, NVLink
inside a node, RDMA across nodes with node-deduplicated sends). All ranks of a gang step together
(every MoE layer is a collective), so a layer takes as long as its slowest rank's compute and the
receive side of its most loaded expert rank. With two microbatches (DESIGN §1: prefill's dual
microbatch, decode's 5-stage pipeline) each half's communication hides behind the other's compute:
a layer costs 2 x max(compute, communication) of one half instead of their sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rayinfer.config import ModelConfig
from rayinfer.sim.calibration import ll_bandwidth
from rayinfer.sim.hardware import Hardware

H800_RDMA = 50e9  # the link DeepEP's low-latency table was measured on; other profiles scale from it


@dataclass
class RankBatch:
    """What one rank computes in one step, summarised from its `SchedulerOutput`."""
    tokens: int = 0            # new tokens computed
    decode_keys: int = 0       # keys read by single-token (decode) rows: sum of their context lengths
    prefill_pairs: float = 0   # (query, key) pairs of multi-token (prefill) chunks, causal
    prefill_keys: int = 0      # keys those chunks read from the cache (their context)
    samples: int = 0           # rows that sample a token (LM head rows)
    rows: int = 0              # sequences scheduled

    @staticmethod
    def from_scheduled(scheduled) -> "RankBatch":
        b = RankBatch()
        for s in scheduled:
            n, start = s.num_new_tokens, s.start
            b.tokens += n
            if n == 1:
                b.decode_keys += start + 1
            else:
                b.prefill_pairs += n * start + n * (n + 1) / 2
                b.prefill_keys += start + n
            b.samples += s.samples
            b.rows += 1
        return b


class CostModel:
    def __init__(self, cfg: ModelConfig, hw: Hardware, ep_size: int, slots_per_rank: float,
                 imbalance: float = 1.0, overlap: bool = True, overlap_min_tokens: int = 32, low_latency: bool = False):
        self.cfg, self.hw, self.ep = cfg, hw, ep_size
        self.slots_per_rank, self.imbalance = slots_per_rank, imbalance
        self.overlap, self.overlap_min_tokens, self.low_latency = overlap, overlap_min_tokens, low_latency
        c = cfg
        h, nh = c.hidden_size, c.num_attention_heads
        q_in = c.q_lora_rank or h
        # Attention projections per layer as (N, K); kv_b covers the absorbed W_UK / W_UV of decode alike.
        self.attn_gemms = ([(c.q_lora_rank, h)] if c.q_lora_rank else []) + [
            (nh * c.qk_head_dim, q_in), (c.kv_cache_dim, h), (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            (h, nh * c.v_head_dim)]
        self.num_moe = len(c.moe_layers)
        self.num_dense = c.num_hidden_layers - self.num_moe
        self.kv_dim = c.kv_cache_dim
        self.nodes = max(1, math.ceil(ep_size / hw.gpus_per_node))
        self.remote_nodes = self._remote_nodes()

    # ---- sizes ----------------------------------------------------------------------------------
    def weight_bytes_per_rank(self) -> float:
        c, wb = self.cfg, self.hw.weight_bytes
        h, mi = c.hidden_size, c.moe_intermediate_size
        attn = sum(n * k for n, k in self.attn_gemms) * c.num_hidden_layers
        dense = 3 * h * c.intermediate_size * self.num_dense
        expert = 3 * h * mi
        moe = (c.n_shared_experts + self.slots_per_rank) * expert * self.num_moe
        embed_head = 2 * c.vocab_size * h * 2  # embedding + head stay BF16
        return (attn + dense + moe) * wb + embed_head

    def kv_bytes_per_token(self) -> float:
        return self.cfg.num_hidden_layers * self.kv_dim * self.hw.act_bytes

    def kv_capacity_tokens(self, kv_memory: float | None = None) -> int:
        """`kv_memory` bytes of KV, or what the device holds after the weights."""
        if kv_memory is None:
            kv_memory = self.hw.memory_bytes * self.hw.max_memory_fraction - self.weight_bytes_per_rank()
        if kv_memory <= 0:
            raise ValueError(f"{self.hw.name}: the weights of one rank ({self.weight_bytes_per_rank() / 1e9:.1f} GB) "
                             f"leave no memory for the KV cache at ep_size={self.ep}")
        return int(kv_memory // self.kv_bytes_per_token())

    # ---- kernels --------------------------------------------------------------------------------
    def gemm(self, m: float, n: int, k: int, w_bytes: float | None = None) -> float:
        if m <= 0:
            return 0.0
        hw = self.hw
        wb = hw.weight_bytes if w_bytes is None else w_bytes
        flops = 2.0 * m * n * k
        peak = hw.matmul_flops if wb == hw.weight_bytes else hw.bf16_flops
        moved = m * k * wb + n * k * wb + m * n * hw.act_bytes
        return max(flops / (hw.gemm_compute_eff * peak), moved / (hw.gemm_mem_eff * hw.hbm_bytes_s)) \
            + hw.kernel_overhead_s

    def attention(self, b: RankBatch, frac: float = 1.0) -> float:
        """Core MLA of one layer for a fraction `frac` of the rank's batch."""
        c, hw = self.cfg, self.hw
        if not b.tokens:
            return 0.0
        nh = c.num_attention_heads
        dec_flops = b.decode_keys * 2 * nh * (self.kv_dim + c.kv_lora_rank)  # absorbed: scores over 576, values 512
        pre_flops = b.prefill_pairs * 2 * nh * (c.qk_head_dim + c.v_head_dim)
        moved = (b.decode_keys + b.prefill_keys) * self.kv_dim * hw.act_bytes
        flops = (dec_flops + pre_flops) * frac
        return max(flops / (hw.attn_compute_eff * hw.bf16_flops), moved * frac / (hw.attn_mem_eff * hw.hbm_bytes_s)) \
            + hw.kernel_overhead_s

    def _remote_nodes(self) -> float:
        """Expected other nodes one token's dispatch reaches (DeepEP sends once per node), with group-limited
        routing: `topk_group` of `n_group` groups, whole groups per node (EPLB's hierarchical policy)."""
        c, nodes = self.cfg, self.nodes
        if nodes == 1 or not c.n_routed_experts:
            return 0.0
        g, kg = c.n_group, c.topk_group
        if g % nodes == 0 and g > 1:
            per = g // nodes
            miss = math.comb(g - per, kg) / math.comb(g, kg)  # one node holds none of the chosen groups
        else:
            miss = (1 - 1 / nodes) ** c.num_experts_per_tok
        return nodes * (1 - miss) * (nodes - 1) / nodes

    def comm(self, tokens: float) -> float:
        """Dispatch + combine of one MoE layer for `tokens` on one rank (FP8 out, BF16 back)."""
        c, hw, ep = self.cfg, self.hw, self.ep
        if ep == 1 or tokens <= 0:
            return 0.0
        h, k = c.hidden_size, c.num_experts_per_tok
        if self.low_latency:
            scale = hw.rdma_bytes_s / H800_RDMA
            return (tokens * k * h * 1 / (ll_bandwidth(ep, "dispatch") * scale)
                    + tokens * k * h * 2 / (ll_bandwidth(ep, "combine") * scale) + 2 * hw.ll_latency_s)
        if self.nodes == 1:
            sent = tokens * k * h * (ep - 1) / ep
            return sent * 3 / hw.nvlink_bytes_s  # 1 byte out, 2 back
        return tokens * self.remote_nodes * h * 3 / hw.rdma_bytes_s

    # ---- a step ---------------------------------------------------------------------------------
    def _compute(self, b: RankBatch, frac: float, recv_tokens: float) -> tuple[float, float]:
        """(dense-layer, MoE-layer) compute of one layer for a fraction of `b`; `recv_tokens` routed here."""
        c = self.cfg
        t = b.tokens * frac
        h = c.hidden_size
        attn = sum(self.gemm(t, n, k) for n, k in self.attn_gemms) + self.attention(b, frac)
        dense = self.gemm(t, 2 * c.intermediate_size, h) + self.gemm(t, h, c.intermediate_size)
        mi = c.moe_intermediate_size
        shared = c.n_shared_experts * (self.gemm(t, 2 * mi, h) + self.gemm(t, h, mi))
        per_slot = recv_tokens / self.slots_per_rank if self.slots_per_rank else 0.0
        # Every local slot's weights are read even when few tokens reach it.
        routed = self.slots_per_rank * (self.gemm(per_slot, 2 * mi, h) + self.gemm(per_slot, h, mi)) \
            if recv_tokens > 0 else 0.0
        gate = self.gemm(t, c.n_routed_experts, h, w_bytes=4) if c.n_routed_experts else 0.0
        lo = self.hw.layer_overhead_s
        return attn + dense + lo, attn + shared + routed + gate + lo

    def max_recv(self, total_tokens: float) -> float:
        """Routed tokens reaching the most loaded rank: the placement's imbalance on the mean, plus the
        expected maximum of the step's sampling noise over the gang's ranks (sqrt(2 ln G) sigmas)."""
        if not self.cfg.n_routed_experts:
            return 0.0
        mean = total_tokens * self.cfg.num_experts_per_tok / self.ep * self.imbalance
        return mean + math.sqrt(2 * math.log(self.ep)) * math.sqrt(mean) if self.ep > 1 else mean

    def step(self, batches: list[RankBatch]) -> dict:
        """Seconds of one gang step where `batches` stand for the gang's ranks (a sample of them: the rest
        are taken to be like them). -> {"seconds", "compute", "comm", "attention_s", "tokens"}."""
        hw = self.hw
        live = [b for b in batches if b.tokens] or batches[:1]
        if not any(b.tokens for b in batches):
            return dict(seconds=0.0, compute=0.0, comm=0.0, tokens=0)
        mean_tokens = sum(b.tokens for b in batches) / len(batches)
        total = mean_tokens * self.ep
        split = self.overlap and self.ep > 1 and min(b.tokens for b in live) >= self.overlap_min_tokens
        frac = 0.5 if split else 1.0
        recv = self.max_recv(total) * frac
        worst_dense = worst_moe = 0.0
        for b in live:
            d, m = self._compute(b, frac, recv)
            worst_dense, worst_moe = max(worst_dense, d), max(worst_moe, m)
        comm = self.comm(max(b.tokens for b in live) * frac)
        moe_layer = 2 * max(worst_moe, comm) if split else worst_moe + comm
        dense_layer = worst_dense / frac if split else worst_dense
        head = max(self.gemm(b.samples, self.cfg.vocab_size, self.cfg.hidden_size, w_bytes=2) for b in live)
        rows = max(b.rows for b in live) * hw.row_overhead_s
        seconds = self.num_dense * dense_layer + self.num_moe * moe_layer + head + hw.step_overhead_s + rows
        return dict(seconds=seconds, compute=self.num_moe * worst_moe / frac + self.num_dense * dense_layer + head,
                    comm=self.num_moe * comm / frac, tokens=mean_tokens)
