"""A stand-in for DeepEP's V1 `Buffer`, for CPU tests of kernels/deepep.py: a gang of ranks as threads of one
process, exchanging tensors through a shared `Fabric`, with the library's documented host-side limits enforced
(what its C++ asserts check, written here from its published docstrings and headers):

- low-latency: bf16, contiguous, 2-D x with x.shape[0] <= num_max_dispatch_tokens_per_rank, that maximum the
  same on every call and rank, (max + 1) * 2 <= the NVSHMEM queue depth, world * max a multiple of 4, the hidden
  size one the kernels are built for, top-k <= 11, int64 expert ids, the buffer as large as its layout needs, a
  low-latency-mode buffer, cleaned after normal kernels used it; received tensors are garbage (NaN) until the
  receive hook runs; at most two low-latency results alive at once; a combine's x shaped
  [local experts, world * max, hidden];
- normal: contiguous 2-D x with 16-byte rows, fp32 weights, int64 ids, the layout's tensors consistent;
- every handle is combined once, on the buffer (and in the mode) that made it;
- every rank issues the same collective each round: a gang whose ranks disagree would hang, here it raises.
"""
from __future__ import annotations

import threading

import torch

LL_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
QP_DEPTH = 1024
CONFIG_RANKS = (2, 4, 8, 16, 24, 32, 64, 128, 144, 160)


def ll_layout_bytes(num_max: int, hidden: int, world: int, num_experts: int) -> int:
    """Bytes the low-latency kernels lay out in the RDMA buffer (two send, two receive and two signal buffers)."""
    scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
    combine_msg = scales * 4 + hidden * 2
    send = max(num_max * dispatch_msg, num_experts * num_max * combine_msg)
    recv = num_experts * num_max * max(dispatch_msg, combine_msg)
    signal = -(-num_experts * 4 // 128) * 128
    return 2 * (send + recv + signal)


class Fabric:
    """The gang's wires: each collective round, every rank posts (op, payload) and all read every post."""

    def __init__(self, world: int):
        self.world = world
        self.posts: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=10)

    def exchange(self, rank: int, op: str, payload) -> list:
        self.posts[rank] = (op, payload)
        self.barrier.wait()
        posts = list(self.posts)
        self.barrier.wait()
        ops = {p[0] for p in posts}
        assert len(ops) == 1, f"ranks issued different collectives {sorted(ops)}: a real gang would hang"
        return [p[1] for p in posts]


class Group:
    def __init__(self, rank: int, fabric: Fabric):
        self._rank, self.fabric = rank, fabric

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self.fabric.world


class Event:
    def current_stream_wait(self):
        pass


class _Config:
    def get_nvl_buffer_size_hint(self, hidden_bytes: int, world: int) -> int:
        return 1 << 20

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, world: int) -> int:
        return 0 if world <= 8 else 1 << 20


class Handle:
    def __init__(self, buffer, mode: str, **info):
        self.buffer, self.mode, self.info, self.used = buffer, mode, info, False


class Buffer:
    calls: list = []  # (rank, op) of every call, in order

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, **_):
        self.group, self.rank, self.world = group, group.rank(), group.size()
        assert num_rdma_bytes == 0 or self.world > 8 or low_latency_mode, "RDMA bytes need >8 ranks or low-latency"
        self.nvl, self.rdma, self.low_latency_mode, self.qps = num_nvl_bytes, num_rdma_bytes, low_latency_mode, \
            num_qps_per_rank
        self.dirty = False  # normal kernels ran since the last clean
        self.ll_max = None
        self.ll_alive: list = []  # low-latency results not yet released (dispatch handles, combine outputs)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max: int, hidden: int, world: int, num_experts: int) -> int:
        return ll_layout_bytes(num_max, hidden, world, num_experts)

    @staticmethod
    def get_dispatch_config(world: int):
        assert world in CONFIG_RANKS, f"Unsupported number of EP ranks: {world}"
        return _Config()

    get_combine_config = get_dispatch_config

    def _log(self, op):
        Buffer.calls.append((self.rank, op))

    # ---- normal mode ----------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts):
        self._log("layout")
        assert topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == torch.int64
        assert num_experts % self.world == 0
        per = num_experts // self.world
        dest = torch.where(topk_idx >= 0, topk_idx // per, -1)
        in_rank = torch.stack([(dest == r).any(1) for r in range(self.world)], 1)  # [T, world]
        per_rank = in_rank.sum(0).int()
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        return per_rank, None if self.world <= 8 else per_rank.clone(), per_expert, in_rank, Event()

    def dispatch(self, x, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                 num_tokens_per_expert=None, topk_idx=None, topk_weights=None, async_finish=False, **_):
        self._log("dispatch")
        assert self.nvl > 0, "normal kernels need an NVLink buffer"
        assert x.dim() == 2 and x.is_contiguous() and (x.shape[1] * x.element_size()) % 16 == 0
        assert topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32 and topk_weights.is_contiguous()
        assert is_token_in_rank.dtype == torch.bool and tuple(is_token_in_rank.shape) == (x.shape[0], self.world)
        assert num_tokens_per_rank.dtype == torch.int32 and num_tokens_per_expert.dtype == torch.int32
        self.dirty = True
        posts = self.group.fabric.exchange(self.rank, "dispatch", (x, topk_idx, topk_weights, is_token_in_rank))
        per = num_tokens_per_expert.shape[0] // self.world
        lo = self.rank * per
        xs, idx, ws, src = [], [], [], []
        for r, (rx, ri, rw, rin) in enumerate(posts):
            rows = rin[:, self.rank].nonzero().view(-1)
            xs.append(rx[rows])
            local = ri[rows]
            idx.append(torch.where((local >= lo) & (local < lo + per), local - lo, -1))
            ws.append(rw[rows])
            src += [(r, int(t)) for t in rows]
        recv_idx = torch.cat(idx)
        counts = [int((recv_idx == e).sum()) for e in range(per)]
        handle = Handle(self, "normal", src=src, tokens=x.shape[0])
        return torch.cat(xs), recv_idx, torch.cat(ws), counts, handle, Event()

    def combine(self, x, handle, topk_weights=None, async_finish=False, **_):
        self._log("combine")
        self._take(handle, "normal")
        src = handle.info["src"]
        assert x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16 and x.shape[0] == len(src)
        posts = self.group.fabric.exchange(self.rank, "combine", (x, src))
        out = torch.zeros(handle.info["tokens"], x.shape[1], dtype=torch.float32)
        for y, rsrc in posts:
            for row, (r, t) in enumerate(rsrc):
                if r == self.rank:
                    out[t] += y[row].float()
        return out.to(torch.bfloat16), None, Event()

    # ---- low-latency mode -----------------------------------------------------------------------------------
    def clean_low_latency_buffer(self, num_max: int, hidden: int, num_experts: int) -> None:
        self._log("clean")
        assert self.low_latency_mode
        self.dirty = False

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=True,
                             return_recv_hook=False, async_finish=False, **_):
        self._log("ll_dispatch")
        m = num_max_dispatch_tokens_per_rank
        assert self.low_latency_mode, "low-latency kernels on a buffer made without low_latency_mode"
        assert not self.dirty, "low-latency kernels after normal ones without clean_low_latency_buffer"
        assert x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16
        assert x.shape[1] in LL_HIDDEN and x.shape[1] % 128 == 0, f"Unsupported hidden {x.shape[1]}"
        assert topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == torch.int64
        assert x.shape[0] == topk_idx.shape[0] and x.shape[0] <= m, f"{x.shape[0]} tokens > max {m} per rank"
        assert topk_idx.shape[1] <= 11 and num_experts % self.world == 0
        assert QP_DEPTH >= (m + 1) * 2 and (self.world * m) % 4 == 0
        assert ll_layout_bytes(m, x.shape[1], self.world, num_experts) <= self.rdma, "RDMA buffer too small"
        assert self.ll_max in (None, m), f"max tokens changed from {self.ll_max} to {m}"
        assert self.qps == num_experts // self.world, "low-latency needs one QP per local expert"
        assert return_recv_hook and not async_finish
        assert len(self.ll_alive) < 2, "more than two low-latency results alive at once"
        self.ll_max = m
        posts = self.group.fabric.exchange(self.rank, "ll_dispatch", (x, topk_idx, m))
        assert {p[2] for p in posts} == {m}, "ranks disagree on num_max_dispatch_tokens_per_rank"
        per = num_experts // self.world
        recv = torch.full((per, self.world * m, x.shape[1]), float("nan"), dtype=torch.bfloat16)
        ready = recv.clone()
        count = torch.zeros(per, dtype=torch.int32)
        src = [[] for _ in range(per)]  # per local expert: (rank, token, k) of each packed row
        for r, (rx, ri, _) in enumerate(posts):
            for t in range(rx.shape[0]):
                for k in range(ri.shape[1]):
                    e = int(ri[t, k]) - self.rank * per
                    if 0 <= e < per:
                        ready[e, int(count[e])] = rx[t]
                        src[e].append((r, t, k))
                        count[e] += 1
        handle = Handle(self, "low_latency", src=src, max=m, hidden=x.shape[1], experts=num_experts)
        self.ll_alive.append(handle)
        return recv, count, handle, Event(), lambda: recv.copy_(ready)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, return_recv_hook=False, **_):
        self._log("ll_combine")
        self._take(handle, "low_latency")
        self.ll_alive.remove(handle)
        m, per = handle.info["max"], handle.info["experts"] // self.world
        assert x.dim() == 3 and x.is_contiguous() and x.dtype == torch.bfloat16
        assert tuple(x.shape) == (per, self.world * m, handle.info["hidden"]), tuple(x.shape)
        assert topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32 and topk_weights.is_contiguous()
        assert topk_weights.shape == topk_idx.shape and topk_weights.shape[0] <= m
        posts = self.group.fabric.exchange(self.rank, "ll_combine", (x, handle.info["src"]))
        out = torch.zeros(topk_idx.shape[0], x.shape[2])
        for y, src in posts:
            for e, rows in enumerate(src):
                for row, (r, t, k) in enumerate(rows):
                    if r == self.rank:
                        out[t] += topk_weights[t, k] * y[e, row].float()
        result = torch.full_like(out, float("nan")).bfloat16()
        self.ll_alive.append(result)

        def hook():
            result.copy_(out)
            self.ll_alive.remove(result)

        return result, Event(), hook

    def _take(self, handle, mode: str) -> None:
        assert isinstance(handle, Handle) and handle.buffer is self, "a handle from another buffer"
        assert handle.mode == mode, f"a {handle.mode} handle given to the {mode} combine"
        assert not handle.used, "a handle combined twice"
        handle.used = True


class Module:
    """What `backends.module("deep_ep")` returns in tests."""
    Buffer = Buffer
