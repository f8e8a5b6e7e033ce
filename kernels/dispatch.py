"""MoE token dispatch and combine: sending tokens to the ranks holding their experts and back.

Contract (DeepEP's normal mode): `dispatch` takes each token's K physical slots and weights and
delivers every token once to each rank owning at least one of its slots, with the slots it owns
there (others -1) and the weights; the receiver computes the weighted sum of its experts' outputs
per received token; `combine` returns those partial sums to the token's home rank and adds them.
Each is split into a launch half and a wait half so a second microbatch can compute while the
first one's bytes are in flight.

Implementations: `LocalDispatcher` (one process, no communication), `AllToAllDispatcher`
(torch.distributed all_to_all with uneven splits: gloo on CPU, NCCL on GPU; tokens, slots and
weights travel as one byte payload, FP8-quantised when asked), and the DeepEP adapter in
deepep.py. `make_dispatcher` picks one; callers never branch on the backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rayinfer.kernels import fp8


@dataclass
class Received:
    x: torch.Tensor  # [N, H] tokens received by this rank
    slots: torch.Tensor  # [N, K] local slot per choice, -1 where the slot lives elsewhere
    weights: torch.Tensor  # [N, K] routing weights (float32)


@dataclass
class CommStats:
    tokens_sent: int = 0  # token copies this rank sent to other ranks
    tokens_received: int = 0  # token copies this rank received from other ranks
    blocked_s: float = 0.0  # time this rank's thread spent waiting on communication
    ops: int = 0

    def snapshot(self) -> dict:
        return dict(self.__dict__)


class LocalDispatcher:
    """Every slot is local: dispatch and combine are identities."""

    def __init__(self):
        self.stats = CommStats()

    def dispatch_launch(self, x, slots, weights):
        return Received(x, slots, weights)

    def dispatch_wait(self, handle) -> Received:
        return handle

    def combine_launch(self, y, handle):
        return y

    def combine_wait(self, handle) -> torch.Tensor:
        return handle


@dataclass
class _Pending:
    work: object  # the in-flight all_to_all
    recv: torch.Tensor
    send_idx: torch.Tensor  # [M] home-token index of every row sent, grouped by destination rank
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int  # home tokens of this rank
    hidden: int
    dtype: torch.dtype
    topk: int


class AllToAllDispatcher:
    def __init__(self, group, rank: int, world: int, slots_per_rank: int, fp8_payload: bool = False):
        self.group, self.rank, self.world, self.spr = group, rank, world, slots_per_rank
        self.fp8_payload = fp8_payload
        self.stats = CommStats()

    def _blocking(self, fn):
        t0 = time.perf_counter()
        out = fn()
        self.stats.blocked_s += time.perf_counter() - t0
        return out

    def _exchange_counts(self, send_counts: torch.Tensor) -> list[int]:
        """Rows each rank sends here, from `send_counts` [world] (on the payload's device: NCCL needs it there)."""
        recv = torch.empty_like(send_counts)
        self._blocking(lambda: dist.all_to_all_single(recv, send_counts, group=self.group))
        return recv.tolist()

    def _a2a(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]):
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        work = dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group, async_op=True)
        self.stats.ops += 1
        return work, recv

    def dispatch_launch(self, x, slots, weights) -> _Pending:
        t, k = slots.shape
        dest = torch.div(slots, self.spr, rounding_mode="floor")  # [T, K] owning rank of each choice
        goes = (dest.unsqueeze(-1) == torch.arange(self.world, device=slots.device)).any(dim=1)  # [T, world]
        owner, send_idx = goes.t().nonzero(as_tuple=True)  # [M] each, grouped by destination rank
        counts = goes.sum(dim=0)  # [world]
        owner = owner.view(-1, 1)  # [M, 1]
        local = torch.where(dest[send_idx] == owner, slots[send_idx] - owner * self.spr, -1)  # [M, K]
        meta = torch.cat([local.float(), weights[send_idx].float()], dim=1)  # [M, 2K]
        payload = _pack(x[send_idx], meta, self.fp8_payload)
        recv_counts = self._exchange_counts(counts)
        send_counts = counts.tolist()  # split sizes must be host ints: the one sync of this dispatcher
        work, recv = self._a2a(payload, send_counts, recv_counts)
        self.stats.tokens_sent += len(send_idx) - send_counts[self.rank]
        self.stats.tokens_received += sum(recv_counts) - recv_counts[self.rank]
        return _Pending(work, recv, send_idx, send_counts, recv_counts, t, x.shape[1], x.dtype, k)

    def dispatch_wait(self, h: _Pending) -> Received:
        self._blocking(h.work.wait)
        k = h.topk
        x, meta = _unpack(h.recv, h.hidden, h.dtype, 2 * k, self.fp8_payload)
        return Received(x, meta[:, :k].long(), meta[:, k:])

    def combine_launch(self, y: torch.Tensor, h: _Pending) -> _Pending:
        work, back = self._a2a(y.contiguous(), h.recv_counts, h.send_counts)
        return _Pending(work, back, h.send_idx, h.send_counts, h.recv_counts, h.num_tokens, y.shape[1], y.dtype, h.topk)

    def combine_wait(self, h: _Pending) -> torch.Tensor:
        self._blocking(h.work.wait)
        out = h.recv.new_zeros(h.num_tokens, h.hidden)
        return out.index_add_(0, h.send_idx, h.recv)


def _pack(x: torch.Tensor, meta: torch.Tensor, use_fp8: bool) -> torch.Tensor:
    """Rows of [token bytes | meta bytes] as one uint8 tensor: one all-to-all moves everything."""
    if use_fp8:
        pad = (-x.shape[1]) % fp8.BLOCK
        xq, scales = fp8.quantize_act_groups(torch.nn.functional.pad(x.float(), (0, pad)))
        parts = [xq.view(torch.uint8), scales.view(torch.uint8)]
    else:
        parts = [x.contiguous().view(torch.uint8)]
    return torch.cat(parts + [meta.contiguous().view(torch.uint8)], dim=1)


def _unpack(buf: torch.Tensor, hidden: int, dtype: torch.dtype, meta_cols: int, use_fp8: bool):
    n = buf.shape[0]
    meta_bytes = meta_cols * 4
    body, meta = buf[:, : buf.shape[1] - meta_bytes], buf[:, buf.shape[1] - meta_bytes:]
    meta = meta.contiguous().view(torch.float32).view(n, meta_cols)
    if use_fp8:
        padded = hidden + (-hidden) % fp8.BLOCK
        xq = body[:, :padded].contiguous().view(fp8.FP8)
        scales = body[:, padded:].contiguous().view(torch.float32).view(n, -1)
        x = (xq.float().view(n, -1, fp8.BLOCK) * scales.unsqueeze(-1)).view(n, padded)[:, :hidden]
        return x.to(dtype), meta
    return body.contiguous().view(dtype).view(n, hidden), meta


def make_dispatcher(group, rank: int, world: int, slots_per_rank: int, hidden: int, device: str,
                    max_step_tokens: int, low_latency_tokens: int = 0, topk: int = 8, fp8_payload: bool = False):
    """The best dispatcher available here: DeepEP on Hopper when installed and healthy on every rank of the gang,
    else torch all-to-all. `max_step_tokens`: the most tokens a step of this rank may dispatch (re-prefills on a
    decode rank included); `low_latency_tokens`: a decode step's size, what DeepEP's low-latency mode is sized for
    (0: not a decode rank). Collective on CUDA: every rank must make the same choice."""
    if world == 1:
        return LocalDispatcher()
    if device.startswith("cuda") and _deep_ep_on_every_rank(group, device):
        from rayinfer.kernels.deepep import DeepEPDispatcher

        return DeepEPDispatcher(group, slots_per_rank * world, hidden, max_step_tokens, low_latency_tokens, topk)
    return AllToAllDispatcher(group, rank, world, slots_per_rank, fp8_payload)


def _deep_ep_on_every_rank(group, device: str) -> bool:
    """Whether DeepEP is installed and passed its probe on every rank: one rank on all-to-all and another on DeepEP
    would wait for each other forever."""
    from rayinfer.kernels import backends

    here = torch.tensor([float(backends.installed("deep_ep") and backends.usable("deep_ep"))], device=device)
    dist.all_reduce(here, op=dist.ReduceOp.MIN, group=group)
    return bool(here.item())
