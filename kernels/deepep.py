"""DeepEP adapter for the dispatcher contract (see dispatch.py), written against DeepEP's published API.

Normal mode (prefill: any number of tokens, NVLink/RDMA buffers) maps one-to-one: DeepEP's
dispatch returns each received token once with its local expert indices (-1 elsewhere) and
weights, and its combine sums per token. Low-latency mode (decode: at most
`max_tokens_per_rank` tokens, IBGDA) delivers tokens packed per local expert and applies the
routing weights inside its combine, so the adapter flattens the packed layout into rows with
unit weights and scatters the expert outputs back. Used only when `deep_ep` imports on a
Hopper GPU; it has not been exercised on hardware by this project's CI.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rayinfer.kernels import backends
from rayinfer.kernels.dispatch import CommStats, Received


@dataclass
class _Pending:
    handle: object
    event: object = None
    hook: object = None
    recv: object = None
    extra: object = None


class DeepEPDispatcher:
    def __init__(self, group, num_slots: int, hidden: int, low_latency: bool, max_tokens_per_rank: int = 128):
        dep = backends.module("deep_ep")
        assert dep is not None, "deep_ep is not importable on this node"
        world = group.size()
        self.num_slots, self.low_latency, self.max_tokens = num_slots, low_latency, max_tokens_per_rank
        self.stats = CommStats()
        if low_latency:
            rdma = dep.Buffer.get_low_latency_rdma_size_hint(max_tokens_per_rank, hidden, world, num_slots)
            self.buffer = dep.Buffer(group, 0, rdma, low_latency_mode=True, num_qps_per_rank=num_slots // world)
        else:
            hidden_bytes = hidden * 2
            nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in
                      (dep.Buffer.get_dispatch_config(world), dep.Buffer.get_combine_config(world)))
            rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, world) for c in
                       (dep.Buffer.get_dispatch_config(world), dep.Buffer.get_combine_config(world)))
            self.buffer = dep.Buffer(group, nvl, rdma)

    def dispatch_launch(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> _Pending:
        slots = slots.long()
        if self.low_latency:
            assert x.shape[0] <= self.max_tokens, f"{x.shape[0]} tokens > low-latency limit {self.max_tokens}"
            recv, count, handle, event, hook = self.buffer.low_latency_dispatch(
                x.to(torch.bfloat16), slots, self.max_tokens, self.num_slots, use_fp8=False, return_recv_hook=True)
            return _Pending(handle, event, hook, recv, (count, slots, weights))
        per_rank, per_rdma, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(slots, self.num_slots)
        recv_x, recv_idx, recv_w, _, handle, event = self.buffer.dispatch(
            x.to(torch.bfloat16), num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=slots,
            topk_weights=weights.float(), async_finish=True)
        return _Pending(handle, event, recv=Received(recv_x, recv_idx, recv_w))

    def dispatch_wait(self, h: _Pending) -> Received:
        if not self.low_latency:
            h.event.current_stream_wait()
            return h.recv
        h.hook()
        count = h.extra[0].tolist()  # tokens received per local expert
        rows = torch.cat([h.recv[e, :n] for e, n in enumerate(count)])  # [N, H]
        local = torch.cat([torch.full((n,), e, device=rows.device) for e, n in enumerate(count)]).unsqueeze(1)
        h.extra = (count, *h.extra[1:])
        return Received(rows, local, torch.ones(rows.shape[0], 1, device=rows.device))

    def combine_launch(self, y: torch.Tensor, h: _Pending) -> _Pending:
        if not self.low_latency:
            out, _, event = self.buffer.combine(y.to(torch.bfloat16), h.handle, async_finish=True)
            return _Pending(None, event, recv=out)
        count, slots, weights = h.extra
        packed = torch.zeros_like(h.recv)  # [E_local, max_tokens * ranks, H]
        start = 0
        for e, n in enumerate(count):
            packed[e, :n] = y[start:start + n].to(packed.dtype)
            start += n
        out, event, hook = self.buffer.low_latency_combine(packed, slots, weights.float(), h.handle,
                                                           return_recv_hook=True)
        return _Pending(None, event, hook, out)

    def combine_wait(self, h: _Pending) -> torch.Tensor:
        if h.hook is not None:
            h.hook()
        else:
            h.event.current_stream_wait()
        return h.recv
