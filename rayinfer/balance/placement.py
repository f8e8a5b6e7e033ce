"""Where every logical expert lives: physical expert slots, spread evenly over the EP ranks.

One dataclass of maps (DeepSeek's EPLB triple), per MoE layer: `phy2log` names the logical
expert in each physical slot, `log2phy` lists each logical expert's slots (padded with -1) and
`logcnt` counts them. Rank r owns slots [r*S, (r+1)*S). A token routed to a replicated expert
goes to one replica chosen by a deterministic rule that spreads the replicas' load: replica
(token + rank + choice) mod count, so tokens of one rank fan out over all copies.
Maps are built on the CPU (from host-side EPLB decisions); a rank moves them to its device with
`to(device)` once, so routing in the step never meets a host tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertPlacement:
    layers: list[int]  # MoE layer indices, in the order of the maps' first dimension
    phy2log: torch.Tensor  # [L, P] logical expert in each physical slot
    log2phy: torch.Tensor  # [L, E, max_cnt] slots of each logical expert, -1 padded
    logcnt: torch.Tensor  # [L, E] replicas of each logical expert
    ep_size: int

    def __post_init__(self):
        num_l, p = self.phy2log.shape
        assert p % self.ep_size == 0, f"{p} slots do not divide over {self.ep_size} ranks"
        assert num_l == len(self.layers) and self.logcnt.shape == self.log2phy.shape[:2]
        if self.logcnt.device.type == "cpu":  # maps are built on the CPU; `to` copies checked ones
            assert bool((self.logcnt >= 1).all()), "every logical expert needs a replica"
        self._row = {layer: i for i, layer in enumerate(self.layers)}

    @property
    def device(self) -> torch.device:
        return self.phy2log.device

    def to(self, device) -> "ExpertPlacement":
        """The same placement with its maps on `device`."""
        return ExpertPlacement(self.layers, self.phy2log.to(device), self.log2phy.to(device), self.logcnt.to(device),
                               self.ep_size)

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    @staticmethod
    def from_phy2log(layers: list[int], phy2log: torch.Tensor, num_logical: int, ep_size: int) -> "ExpertPlacement":
        phy2log = phy2log.long()
        num_l, p = phy2log.shape
        logcnt = torch.zeros(num_l, num_logical, dtype=torch.long)
        logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
        log2phy = torch.full((num_l, num_logical, int(logcnt.max())), -1, dtype=torch.long)
        for i in range(num_l):
            seen = [0] * num_logical
            for slot, e in enumerate(phy2log[i].tolist()):
                log2phy[i, e, seen[e]] = slot
                seen[e] += 1
        return ExpertPlacement(list(layers), phy2log, log2phy, logcnt, ep_size)

    @staticmethod
    def initial(layers: list[int], num_logical: int, num_redundant: int, ep_size: int) -> "ExpertPlacement":
        """Before any load is known: every expert once, in order, then redundant copies of 0, 1, ..."""
        p = num_logical + num_redundant
        if p % ep_size:
            raise ValueError(f"{num_logical} experts + num_redundant_experts={num_redundant} = {p} slots "
                             f"do not divide evenly over ep_size={ep_size} ranks")
        row = torch.cat([torch.arange(num_logical), torch.arange(num_redundant) % num_logical])
        return ExpertPlacement.from_phy2log(layers, row.repeat(len(layers), 1), num_logical, ep_size)

    def local_experts(self, rank: int) -> dict[int, list[int]]:
        """MoE layer -> logical expert in each of `rank`'s slots (what the loader reads for it)."""
        s = self.slots_per_rank
        return {layer: self.phy2log[i, rank * s:(rank + 1) * s].tolist() for i, layer in enumerate(self.layers)}

    def route(self, layer: int, topk_logical: torch.Tensor, rank: int) -> torch.Tensor:
        """topk_logical [T, K] -> physical slot ids [T, K]."""
        i = self._row[layer]
        t, k = topk_logical.shape
        cnt = self.logcnt[i][topk_logical]  # [T, K]
        dev = topk_logical.device
        spread = torch.arange(t, device=dev).unsqueeze(1) + torch.arange(k, device=dev).unsqueeze(0) + rank  # [T, K]
        replica = spread % cnt
        return self.log2phy[i][topk_logical, replica]
