"""Live expert-parallel load balancing: measure, re-place, move expert weights, between steps.

Every rank counts the tokens each logical expert receives in its slots over a sliding window
(`ExpertLoadWindow`). Each lockstep vote also carries every rank's total receive load, so all
ranks know the gang's max/mean at every step. When a rebalance is due (every `interval_s`, or
asked for), the vote says so and every rank, between the same two steps: sums the windows
over the gang, takes rank 0's `rebalance_experts` placement (broadcast, so all agree), and
fills its new slots — from slots it already has, else from the checkpoint. Attention weights
and KV caches are untouched, so in-flight requests simply continue on the next step; a
replica of an expert computes what the original did, so greedy outputs do not change.
Statistics and the chosen placement cross the gang on the gloo control group as host tensors;
the placement's maps then go to the rank's device. Every tensor of an expert slot that has the
slot dimension first (weights, FP8 scales, whatever they are named) moves with its slot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rayinfer.balance.eplb import max_gpu_load, rebalance_experts
from rayinfer.balance.placement import ExpertPlacement
from rayinfer.model.loader import read_experts


@dataclass
class RebalanceRecord:
    at: float
    imbalance_before: float  # max/mean receive load over ranks, measured in the window before
    seconds: float
    slots_changed: int
    from_local: int
    from_checkpoint: int


@dataclass
class LiveRebalancer:
    engine: object
    group: object
    rank: int
    num_groups: int = 1
    interval_s: float = 0.0  # 0: only on demand
    min_tokens: int = 1  # a window with fewer received tokens is too thin to act on
    requested: bool = False
    last: float = field(default_factory=time.monotonic)
    history: list = field(default_factory=list)  # RebalanceRecords of the rebalances done
    attempts: int = 0  # rebalances run, including those skipped for want of measured load

    @property
    def ctx(self):
        return self.engine.runner.ctx

    def vote_extras(self) -> tuple[bool, float]:
        """(whether this rank wants a rebalance now, its receive load in the window)."""
        due = self.interval_s > 0 and self.rank == 0 and time.monotonic() - self.last >= self.interval_s
        return self.requested or due, float(self.ctx.received_tokens)

    def after_vote(self, vote) -> None:
        if vote.rebalance:
            self.run(imbalance(vote.loads))

    def run(self, imbalance_before: float) -> RebalanceRecord | None:
        try:
            return self._run(imbalance_before)
        finally:
            self.attempts += 1

    def _run(self, imbalance_before: float) -> RebalanceRecord | None:
        t0 = time.monotonic()
        self.requested, self.last = False, t0
        ctx = self.ctx
        load = ctx.load.sum.double().cpu()
        dist.all_reduce(load, group=self.group)  # [L, E] the gang's receive counts (self.group: control, gloo)
        if float(load.sum()) < self.min_tokens:
            return None
        device = ctx.placement.device
        old = ctx.placement.to("cpu")
        phy2log = torch.empty_like(old.phy2log)
        if self.rank == 0:
            phy2log = choose_placement(load.float(), old, self.num_groups)
        dist.broadcast(phy2log, src=0, group=self.group)  # one placement, whatever each rank's float rounding
        new = ExpertPlacement.from_phy2log(old.layers, phy2log, old.log2phy.shape[1], old.ep_size).to(device)
        changed, local, ckpt = move_experts(self.engine.runner.model, new, self.rank,
                                            self.engine.runner.checkpoint_path)
        ctx.placement = new
        ctx.load.clear()
        record = RebalanceRecord(time.time(), imbalance_before, time.monotonic() - t0, changed, local, ckpt)
        self.history.append(record)
        return record


def choose_placement(load: torch.Tensor, old: ExpertPlacement, num_groups: int) -> torch.Tensor:
    """phy2log [L, slots] for measured `load` [L, E]: EPLB's placement in the layers where it lowers the
    peak rank load, the current one elsewhere (moving weights for nothing costs a pause and reads)."""
    cand = rebalance_experts(load, old.num_slots, num_groups, 1, old.ep_size)[0]
    current = old.phy2log.to(cand.dtype)
    better = max_gpu_load(load, cand, old.ep_size) < max_gpu_load(load, current, old.ep_size) * (1 - 1e-3)
    return torch.where(better[:, None], cand, current).to(old.phy2log.dtype)


def imbalance(loads) -> float:
    loads = [float(x) for x in loads]
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def slot_tensors(experts) -> dict[str, torch.Tensor]:
    """Every tensor of `experts` indexed by slot first: parameters, buffers and plain tensor attributes
    (FP8 scales kept beside the weights), so a move carries them all whatever they are named."""
    n = len(experts.logical_ids)
    found = {**dict(experts.named_parameters(recurse=False)), **dict(experts.named_buffers(recurse=False)),
             **{k: v for k, v in vars(experts).items() if isinstance(v, torch.Tensor)}}
    return {k: v for k, v in found.items() if v is not None and v.dim() >= 1 and v.shape[0] == n}


def _fetched_parts(value) -> dict[str, torch.Tensor]:
    """A checkpoint read of one expert as {slot tensor name: tensor}; the reader gives (w13, w2) or a dict."""
    return dict(value) if isinstance(value, dict) else dict(zip(("w13", "w2"), value))


def move_experts(model, new: ExpertPlacement, rank: int, checkpoint: str) -> tuple[int, int, int]:
    """Refills this rank's expert slots for `new`; -> (slots changed, filled locally, read from checkpoint)."""
    targets = new.local_experts(rank)
    changed = local = 0
    plans = []
    for moe in model.moe_layers:
        want = targets.get(moe.layer_idx)
        if want is None or want == moe.experts.logical_ids:
            continue
        have = {e: s for s, e in enumerate(moe.experts.logical_ids)}
        plans.append((moe, want, have))
    wanted = sorted({(m.layer_idx, e) for m, want, have in plans for e in want if e not in have})
    fetched = read_experts(checkpoint, wanted, plans[0][0].experts.w13.dtype) if wanted else {}
    for moe, want, have in plans:
        ex = moe.experts
        tensors = slot_tensors(ex)  # name -> [S, ...]
        moved = {name: torch.empty_like(t) for name, t in tensors.items()}
        for s, e in enumerate(want):
            if e in have:
                for name, t in tensors.items():
                    moved[name][s] = t[have[e]]
                local += have[e] != s
            else:
                parts = _fetched_parts(fetched[(moe.layer_idx, e)])
                missing = sorted(set(tensors) - set(parts))
                if missing:
                    raise ValueError(f"layer {moe.layer_idx} expert {e}: the checkpoint read gave {sorted(parts)}, "
                                     f"not the slot tensors {missing}")
                for name in tensors:
                    moved[name][s] = parts[name]
            changed += ex.logical_ids[s] != e
        for name, t in moved.items():
            if isinstance(tensors[name], torch.nn.Parameter):
                tensors[name].data = t
            else:
                setattr(ex, name, t)
        ex.logical_ids = list(want)
    return changed, local, len(wanted)
