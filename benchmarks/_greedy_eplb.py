"""Reference port of DeepSeek's published greedy EPLB policy, for comparison only.

Owns nothing the library uses: the benchmark (`benchmarks/eplb.py`) and the tests
(`tests/test_eplb.py`) load it by file path to measure `rayinfer.balance.eplb` against the
policy it is meant to beat. Behaviour follows github.com/deepseek-ai/EPLB: replicas go one at
a time to the expert with the largest load per replica, and packing sends items, heaviest
first, to the lightest pack that still has room (same-GPU replicas are allowed there too).
It computes in float64 where the original uses float32, which only matters for near-ties.
"""

import torch


def _greedy_pack(weight: torch.Tensor, num_packs: int) -> torch.Tensor:
    """Items listed pack by pack, each pack in the order it received them: a permutation
    [rows, n]; every pack takes exactly n / num_packs items."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:  # as published: one item per pack keeps the identity order
        return torch.arange(n).repeat(rows, 1)
    order = weight.sort(dim=-1, descending=True, stable=True).indices.tolist()
    w = weight.tolist()
    listing = torch.empty(rows, n, dtype=torch.int64)  # [rows, n]
    for r in range(rows):
        loads, fill = [0.0] * num_packs, [0] * num_packs
        for item in order[r]:
            p = min((q for q in range(num_packs) if fill[q] < per_pack), key=loads.__getitem__)
            listing[r, p * per_pack + fill[p]] = item
            loads[p] += w[r][item]
            fill[p] += 1
    return listing


def _greedy_replicate(weight: torch.Tensor, num_phy: int):
    rows, n = weight.shape
    phy2log = torch.arange(num_phy).remainder(n).repeat(rows, 1)  # [rows, num_phy]
    cnt = torch.ones(rows, n, dtype=torch.int64)  # [rows, n]
    row = torch.arange(rows)
    for slot in range(n, num_phy):
        best = (weight / cnt).max(-1).indices
        phy2log[:, slot] = best
        cnt[row, best] += 1
    return phy2log, cnt


def greedy_rebalance(weight: torch.Tensor, num_replicas: int, num_groups: int,
                     num_nodes: int, num_gpus: int):
    """(phy2log [L, R], logcnt [L, E]) of the published policy (its log2phy is not needed here)."""
    weight = weight.double().cpu()
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    layers, n = weight.shape
    gsize = n // num_groups
    per_node = n // num_nodes
    # 1. groups -> nodes; experts renumbered node by node ("mlog").
    gw = weight.view(layers, num_groups, gsize).sum(-1)  # [L, groups]
    gorder = _greedy_pack(gw, num_nodes)  # [L, groups]
    mlog2log = (gorder.unsqueeze(-1) * gsize + torch.arange(gsize)).flatten(1)  # [L, E]
    # 2. replicas inside each node.
    wm = weight.gather(1, mlog2log).view(layers * num_nodes, per_node)  # [L*N, E/N]
    phy2mlog, cnt = _greedy_replicate(wm, num_replicas // num_nodes)  # [L*N, R/N]
    # 3. replicas -> GPUs of the node.
    item = (wm / cnt).gather(1, phy2mlog)  # [L*N, R/N]
    order = _greedy_pack(item, num_gpus // num_nodes)  # [L*N, R/N]
    mlog = phy2mlog.gather(1, order).view(layers, num_nodes, -1)
    mlog = (mlog + torch.arange(num_nodes).view(1, -1, 1) * per_node).flatten(1)  # [L, R]
    phy2log = mlog2log.gather(1, mlog)
    logcnt = torch.zeros(layers, n, dtype=torch.int64).scatter_add_(
        1, phy2log, torch.ones_like(phy2log))
    return phy2log, logcnt
