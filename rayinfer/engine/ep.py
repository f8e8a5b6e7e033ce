"""The expert-parallel context a rank passes to the model: where experts live and how tokens reach them.

Owns the rank's view of the placement, its dispatcher (all-to-all between the gang's ranks),
and the per-layer expert receive-load window (for EPLB). The model sees only the launch/wait
halves of dispatch and combine (`Block.stages`). Placement maps and load counts live
on the rank's device (counting needs no host sync); gang-wide decisions (the microbatch count)
go over the gloo control group with host tensors, never over the device group.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from rayinfer.balance.placement import ExpertPlacement
from rayinfer.kernels.dispatch import Received


class ExpertLoadWindow:
    """Tokens received per (MoE layer, logical expert) over the last `window` steps, kept as a running sum."""

    def __init__(self, num_layers: int, num_logical: int, window: int = 1000, device="cpu"):
        self.steps: deque[torch.Tensor] = deque()
        self.window = window
        self.current = torch.zeros(num_layers, num_logical, dtype=torch.long, device=device)  # [L, E] this step
        self.sum = torch.zeros_like(self.current)  # [L, E] over the window
        self.total = torch.zeros_like(self.current)  # [L, E] since start
        self._received = False  # whether this step received any token (known from shapes, no sync)

    def add(self, row: int, logical: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Counts `logical` expert ids (each `weight` times, default once) into layer row `row`."""
        logical = logical.reshape(-1)
        weight = torch.ones_like(logical) if weight is None else weight.reshape(-1).to(self.current.dtype)
        self.current[row].index_add_(0, logical, weight)
        self._received |= logical.numel() > 0

    def end_step(self) -> None:
        if self._received:
            self._received = False
            self.steps.append(self.current)
            self.sum += self.current
            self.total += self.current
            if len(self.steps) > self.window:
                self.sum -= self.steps.popleft()
            self.current = torch.zeros_like(self.current)

    def clear(self) -> None:
        """Forget the window: loads measured under a placement that no longer exists."""
        self.steps.clear()
        self.sum.zero_()


class EPContext:
    def __init__(self, rank: int, placement: ExpertPlacement, dispatcher, overlap: bool = True,
                 decode_split: bool = False, control=None, overlap_min_tokens: int = 0, window_steps: int = 1000):
        self.rank, self.ep_size = rank, placement.ep_size
        self.placement = placement
        self.dispatcher = dispatcher
        self.overlap = overlap
        self.decode_split = decode_split  # DeepSeek's decode pipeline: attention in two stages
        self.control, self.overlap_min_tokens = control, overlap_min_tokens  # the gang's gloo group
        self.load = ExpertLoadWindow(len(placement.layers), placement.log2phy.shape[1], window_steps,
                                     placement.device)
        self.tokens_computed = 0  # this rank's own DP tokens run through the model
        self.steps = 0
        self.step_s = 0.0  # wall time of this rank's forward steps (compute + exposed communication)

    def dispatch_launch(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor):
        slots = self.placement.route(layer, topk_idx, self.rank)
        return layer, self.dispatcher.dispatch_launch(x, slots, topk_w)

    def dispatch_wait(self, handle) -> Received:
        layer, inner = handle
        recv = self.dispatcher.dispatch_wait(inner)
        row = self.placement._row[layer]
        base = self.rank * self.placement.slots_per_rank
        # Slots elsewhere (-1) count zero times: a mask, not a selection, so no host sync.
        mine = recv.slots >= 0
        self.load.add(row, self.placement.phy2log[row, base + recv.slots.clamp(min=0)], mine)
        return recv

    def combine_launch(self, y: torch.Tensor, handle):
        return self.dispatcher.combine_launch(y, handle[1])

    def combine_wait(self, handle) -> torch.Tensor:
        return self.dispatcher.combine_wait(handle)

    def num_microbatches(self, local_tokens: int) -> int:
        """2 when overlapping pays off on the busiest rank, else 1; the same answer on every rank.

        Splitting a small step only doubles each expert's weight reads, so below
        `overlap_min_tokens` tokens (on every rank) the step runs as one microbatch. The choice
        must be gang-wide: every rank has to issue the same sequence of collectives. A gang of one
        rank has no all-to-all to hide: one microbatch, and no vote. The same vote gives a size-aware
        dispatcher (DeepEP: low-latency kernels for decode-sized steps, normal ones for larger) the
        gang's largest step."""
        plan = getattr(self.dispatcher, "plan_step", None)  # a dispatcher whose kernels depend on the step's size
        voting = self.control is not None and self.ep_size > 1
        most = None
        if voting and (plan is not None or (self.overlap and self.overlap_min_tokens)):
            votes = torch.tensor([local_tokens])
            dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.control)
            most = int(votes)
        if plan is not None:
            plan(most)  # the gang's largest step: the same on every rank, so the same kernels
        if not self.overlap or self.ep_size == 1:
            return 1
        if most is None:
            return 2
        return 2 if most >= self.overlap_min_tokens else 1

    @property
    def received_tokens(self) -> int:
        """Token-expert pairs this rank's slots received in the window (its dispatch receive load)."""
        return int(self.load.sum.sum())

    def stats(self) -> dict:
        return dict(self.dispatcher.stats.snapshot(), tokens_computed=self.tokens_computed, rank=self.rank,
                    steps=self.steps, step_s=self.step_s, expert_recv_window=self.received_tokens)
