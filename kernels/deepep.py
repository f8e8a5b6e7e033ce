"""DeepEP adapter for the dispatcher contract (see dispatch.py), written against DeepEP's published V1 `Buffer` API.

Normal mode (any number of tokens, NVLink/RDMA buffers) maps one-to-one: DeepEP's dispatch returns each received
token once with its local expert indices (-1 elsewhere) and weights, and its combine sums per token. Low-latency
mode (decode, IBGDA) takes at most `num_max_dispatch_tokens_per_rank` tokens a rank, the same value on every
rank and on every call, delivers tokens packed per local expert and applies the routing weights inside its
combine, so the adapter flattens the packed layout into rows with unit weights and scatters the expert outputs
back. Its buffer grows with that maximum times the number of experts, and NVSHMEM's default queue depth (1024)
caps it at 511, so it is sized for a decode step (`low_latency_tokens`), never for the largest step a decode rank
may run: a re-prefill after a failed KV transfer or a lost rank (up to `max_num_batched_tokens`). Such a step
runs in normal mode on the same buffer, which then needs cleaning before the next low-latency call. The mode is
chosen per step from the gang's largest step (`plan_step`, fed by the EP context's vote), so every rank issues
the same kernels. Used only when `deep_ep` imports on a Hopper GPU and its probe passed on every rank of the
gang; it has not been exercised on hardware by this project: CPU tests run it against a fake that enforces the
library's documented limits (tests/fake_deepep.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rayinfer.kernels import backends
from rayinfer.kernels.dispatch import CommStats, Received

log = logging.getLogger("rayinfer.kernels")

LL_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)  # hidden sizes the low-latency kernels are built for
LL_MAX_TOPK = 11
NVSHMEM_QP_DEPTH = 1024  # DeepEP's default; low-latency needs (max tokens + 1) * 2 <= it
LL_MAX_TOKENS = NVSHMEM_QP_DEPTH // 2 - 1


def low_latency_size(world: int, decode_tokens: int, hidden: int, topk: int) -> int:
    """Tokens per rank the low-latency buffer is sized for (0: this gang cannot use low-latency mode): a decode step's
    tokens, rounded up so that world x tokens is a multiple of 4 (its TMA loads), within the queue-depth cap."""
    if hidden not in LL_HIDDEN or topk > LL_MAX_TOPK or decode_tokens <= 0:
        return 0
    n = decode_tokens
    while (world * n) % 4:
        n += 1
    return n if n <= LL_MAX_TOKENS else 0


@dataclass
class _Pending:
    mode: str  # "low_latency" | "normal": the kernels this dispatch (and its combine) use
    handle: object
    event: object = None
    hook: object = None
    recv: object = None
    extra: object = None


class DeepEPDispatcher:
    def __init__(self, group, num_slots: int, hidden: int, max_step_tokens: int, low_latency_tokens: int = 0,
                 topk: int = 8):
        """`max_step_tokens`: the most tokens one step of this rank may dispatch; `low_latency_tokens` (decode ranks):
        steps of at most this many tokens on every rank use the low-latency kernels; 0: normal mode only."""
        dep = backends.module("deep_ep")
        assert dep is not None, "deep_ep is not importable on this node"
        world = group.size()
        assert num_slots % world == 0, (num_slots, world)
        self.num_slots, self.hidden, self.max_step = num_slots, hidden, max_step_tokens
        self.ll_tokens = low_latency_size(world, low_latency_tokens, hidden, topk) if low_latency_tokens else 0
        if low_latency_tokens and not self.ll_tokens:
            log.warning("DeepEP low-latency mode cannot take %d tokens a rank at hidden %d, top-%d: normal mode only",
                        low_latency_tokens, hidden, topk)
        self.normal = self.ll_tokens < max_step_tokens  # some step may exceed the low-latency size
        self.stats = CommStats()
        self._step_mode: str | None = None
        self._dirty = False  # normal kernels ran since the low-latency buffer was last clean
        nvl = rdma = 0
        if self.normal:
            hidden_bytes = hidden * 2
            configs = (dep.Buffer.get_dispatch_config(world), dep.Buffer.get_combine_config(world))
            nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in configs)
            rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, world) for c in configs)
        if self.ll_tokens:
            rdma = max(rdma, dep.Buffer.get_low_latency_rdma_size_hint(self.ll_tokens, hidden, world, num_slots))
            self.buffer = dep.Buffer(group, nvl, rdma, low_latency_mode=True, num_qps_per_rank=num_slots // world)
        else:
            self.buffer = dep.Buffer(group, nvl, rdma)

    def plan_step(self, gang_max_tokens: int | None) -> None:
        """The next step's kernels, from the most tokens any rank of the gang dispatches in it (the same on every
        rank). None: unknown (no vote), allowed only when every step fits the low-latency size or none uses it."""
        if gang_max_tokens is None:
            self._step_mode = None
        else:
            self._step_mode = "low_latency" if gang_max_tokens <= self.ll_tokens else "normal"

    def _mode(self, tokens: int) -> str:
        if not self.ll_tokens:
            return "normal"
        if not self.normal:
            return "low_latency"  # every step this rank runs fits
        assert self._step_mode is not None, \
            "a decode rank whose steps may exceed the low-latency size needs the gang's step size (plan_step)"
        assert self._step_mode == "normal" or tokens <= self.ll_tokens, (tokens, self.ll_tokens)
        return self._step_mode

    def dispatch_launch(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> _Pending:
        slots = slots.long().contiguous()
        x = x.to(torch.bfloat16).contiguous()
        mode = self._mode(x.shape[0])
        if mode == "low_latency":
            if self._dirty:  # normal kernels used the buffer: the low-latency ones need their part zeroed
                self.buffer.clean_low_latency_buffer(self.ll_tokens, self.hidden, self.num_slots)
                self._dirty = False
            recv, count, handle, event, hook = self.buffer.low_latency_dispatch(
                x, slots, self.ll_tokens, self.num_slots, use_fp8=False, return_recv_hook=True)
            return _Pending(mode, handle, event, hook, recv, (count, slots, weights.float().contiguous()))
        self._dirty = bool(self.ll_tokens)
        per_rank, per_rdma, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(slots, self.num_slots)
        recv_x, recv_idx, recv_w, _, handle, event = self.buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=slots,
            topk_weights=weights.float().contiguous(), async_finish=True)
        return _Pending(mode, handle, event, recv=Received(recv_x, recv_idx, recv_w))

    def dispatch_wait(self, h: _Pending) -> Received:
        if h.mode == "normal":
            h.event.current_stream_wait()
            return h.recv
        h.hook()
        count = h.extra[0].tolist()  # tokens received per local expert
        rows = torch.cat([h.recv[e, :n] for e, n in enumerate(count)])  # [N, H]
        local = torch.cat([torch.full((n,), e, device=rows.device) for e, n in enumerate(count)]).unsqueeze(1)
        h.extra = (count, *h.extra[1:])
        return Received(rows, local, torch.ones(rows.shape[0], 1, device=rows.device))

    def combine_launch(self, y: torch.Tensor, h: _Pending) -> _Pending:
        if h.mode == "normal":
            out, _, event = self.buffer.combine(y.to(torch.bfloat16).contiguous(), h.handle, async_finish=True)
            return _Pending(h.mode, None, event, recv=out)
        count, slots, weights = h.extra
        packed = torch.zeros_like(h.recv)  # [E_local, ll_tokens * ranks, H]
        start = 0
        for e, n in enumerate(count):
            packed[e, :n] = y[start:start + n].to(packed.dtype)
            start += n
        out, event, hook = self.buffer.low_latency_combine(packed, slots, weights, h.handle, return_recv_hook=True)
        return _Pending(h.mode, None, event, hook, out)

    def combine_wait(self, h: _Pending) -> torch.Tensor:
        if h.hook is not None:
            h.hook()
        else:
            h.event.current_stream_wait()
        return h.recv


def round_trip(dispatcher, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, slots_per_rank: int):
    """One dispatch/combine where local expert e multiplies its tokens by e + 1: (combined, expected) at home."""
    recv = dispatcher.dispatch_wait(h := dispatcher.dispatch_launch(x, slots, weights))
    mine = (recv.slots >= 0).float()
    scale = (recv.weights.float() * (recv.slots.clamp(min=0) + 1) * mine).sum(1, keepdim=True)  # [N, 1]
    got = dispatcher.combine_wait(dispatcher.combine_launch(recv.x.float() * scale, h))
    want = x.float() * (weights.float() * (slots % slots_per_rank + 1)).sum(1, keepdim=True)
    return got, want


def _probe_rank(rank: int, port: int, world: int) -> None:
    import torch.distributed as dist

    from rayinfer.kernels import probe

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spr, hidden = 2, 2048
    d = DeepEPDispatcher(dist.group.WORLD, spr * world, hidden, max_step_tokens=64, low_latency_tokens=8, topk=2)
    g = torch.Generator(device="cuda").manual_seed(rank)
    for tokens in (5, 40):  # a decode-sized step (low-latency), then a re-prefill-sized one (normal mode)
        d.plan_step(tokens)  # one rank: its own step is the gang's largest
        x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
        slots = torch.randint(0, spr * world, (tokens, 2), device="cuda", generator=g)
        weights = torch.rand(tokens, 2, device="cuda", generator=g)
        got, want = round_trip(d, x, slots, weights, spr)
        torch.cuda.synchronize()
        probe.check_close(got, want, f"deep_ep {tokens}-token round trip on rank {rank}")
    dist.destroy_process_group()


def probe_deep_ep() -> None:
    """Health probe (run in a child by kernels.probe): DeepEP imports, was built for sm90, sizes its buffers; with
    two GPUs, a two-rank round trip in both modes against the expected sums."""
    import socket

    dep = backends.module("deep_ep")
    if dep is None:
        raise SystemExit("deep_ep does not import here")
    if hasattr(dep.Buffer, "is_sm90_compiled") and not dep.Buffer.is_sm90_compiled():
        raise SystemExit("deep_ep was built without sm90 kernels")
    if not dep.Buffer.get_low_latency_rdma_size_hint(8, 7168, 2, 16) > 0:
        raise SystemExit("deep_ep sizes no low-latency buffer")
    if torch.cuda.device_count() >= 2:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_probe_rank, args=(port, 2), nprocs=2, start_method="spawn")
