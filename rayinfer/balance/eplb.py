"""Expert-parallel load balancer (EPLB): which physical slot holds which expert.

Owns `rebalance_experts`, the placement every MoE layer routes by (the signature and meaning of
DeepSeek's published EPLB), and the load metrics `gpu_loads` / `balancedness` that tests, the
benchmark and the live rebalancer judge a placement by. CPU torch tensors in and out; nothing
here touches devices, processes or Ray.

Layout: with S = num_replicas / num_gpus, GPU g owns slots [g*S, (g+1)*S) and node n owns GPUs
[n*G/N, (n+1)*G/N). Objective: the smallest maximum GPU load, an expert's load being split
evenly over its replicas. Policies, as published: hierarchical when num_groups % num_nodes == 0
(whole expert groups go to nodes, each node the same number of groups and the same number of
slots, holding replicas of its own experts only), global otherwise (one pool of all GPUs).
The search lives in `eplb_search.py` / `eplb_pack.py`. Replicas of one expert may share a GPU,
as the published policy allows: it can only help the objective, and a last pass swaps such
copies apart wherever the worst GPU stays as light. On every pool the result is never worse
than the published policy's for the same node partition and tie order.
"""

import contextlib
import math
import operator

import torch

from rayinfer.balance.eplb_pack import pack
from rayinfer.balance.eplb_search import local_search, place


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int,
                      num_nodes: int, num_gpus: int):
    """Place `num_replicas` expert replicas per layer from `weight` [layers, num_logical] loads.

    Returns (phy2log [L, R] logical expert of every slot, log2phy [L, E, max_replicas] slots of
    every expert in increasing order padded with -1, logcnt [L, E] replica counts), all int64.
    """
    w, (num_replicas, num_groups, num_nodes, num_gpus) = _checked(
        weight, num_replicas, num_groups, num_nodes, num_gpus)  # w: [L, E] float64
    layers, num_logical = w.shape
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    with _one_thread():
        plain, balanced = _group_partitions(w, num_groups, num_nodes)  # [L, N, E/N] each
        # Re-balancing node sums by swaps may, rarely, leave a node harder to pack: solve the
        # layers it changed both ways and keep the better, so no layer ends worse than plain.
        redo = (plain != balanced).flatten(1).any(1).nonzero().flatten()  # [D]
        phy2log = _place(torch.cat([w, w[redo]]), torch.cat([plain, balanced[redo]]),
                         num_replicas, num_gpus)  # [L + D, R]
        phy2log, alt = phy2log[:layers], phy2log[layers:]
        better = max_gpu_load(w[redo], alt, num_gpus) < max_gpu_load(w[redo], phy2log[redo], num_gpus)
        phy2log[redo[better]] = alt[better]
    logcnt = torch.zeros(layers, num_logical, dtype=torch.int64).scatter_add_(
        1, phy2log, torch.ones_like(phy2log))  # [L, E]
    return phy2log, _log2phy(phy2log, logcnt), logcnt


def _place(w, members, num_replicas, num_gpus):
    """phy2log [L, R] from loads [L, E] and each node's experts `members` [L, N, E/N]."""
    layers, num_nodes, _ = members.shape
    pools = w.gather(1, members.flatten(1)).view(layers * num_nodes, -1)  # [L*N, E/N]
    slots = place(pools, num_replicas // num_nodes, num_gpus // num_nodes)  # [L*N, R/N]
    return members.gather(2, slots.view(layers, num_nodes, -1)).flatten(1)


def max_gpu_load(w: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """The most loaded GPU's load per layer [L] under placement `phy2log`."""
    ones = torch.ones_like(phy2log)
    logcnt = torch.zeros_like(w, dtype=torch.int64).scatter_add_(1, phy2log, ones)  # [L, E]
    return gpu_loads(w, phy2log, logcnt, num_gpus).max(1).values


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor,
              num_gpus: int) -> torch.Tensor:
    """Load of every GPU [L, G] (float64): each slot carries its expert's load / replica count."""
    layers, slots = phy2log.shape
    if slots % num_gpus:
        raise ValueError(f"{slots} slots do not split evenly over num_gpus={num_gpus}")
    w = weight.detach().to("cpu", torch.float64)
    per_replica = w / logcnt.to(torch.float64).clamp_min(1)  # [L, E]
    return per_replica.gather(1, phy2log).view(layers, num_gpus, slots // num_gpus).sum(-1)


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor,
                 num_gpus: int) -> torch.Tensor:
    """Max over mean GPU load per layer [L] (1.0 is perfect; a layer with no load counts 1.0)."""
    load = gpu_loads(weight, phy2log, logcnt, num_gpus)
    mean = load.mean(1)
    return torch.where(mean > 0, load.max(1).values / mean.clamp_min(1e-300), 1.0)


def _group_partitions(w: torch.Tensor, num_groups: int, num_nodes: int):
    """Experts of each node [L, N, E/N] as whole groups: heaviest-first packing of group loads
    (the published step), and that packing improved by group swaps between nodes."""
    layers, num_logical = w.shape
    size = num_logical // num_groups
    group_load = w.view(layers, num_groups, size).sum(-1)  # [L, groups]
    ones = torch.ones_like(group_load, dtype=torch.int64)
    plain, _ = pack(group_load, ones, num_nodes, pairs=False)  # [L, groups], by node
    swapped, _ = local_search(group_load, ones, plain.clone(), num_nodes, fixed_counts=True)

    def experts(groups):
        # Groups keep their packing order inside a node, as published: equal loads then
        # resolve the same way in every later step.
        groups = groups.view(layers, num_nodes, -1)  # [L, N, groups/N]
        return (groups[..., None] * size + torch.arange(size)).flatten(2)  # [L, N, E/N]

    return experts(plain), experts(swapped)


def _log2phy(phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    layers, num_logical = logcnt.shape
    width = int(logcnt.max())
    order = phy2log.argsort(dim=1, stable=True)  # [L, R] slots grouped by expert, ascending
    expert = phy2log.gather(1, order)  # [L, R]
    first = logcnt.cumsum(1) - logcnt  # [L, E] position of each expert's first slot in `order`
    rank = torch.arange(phy2log.shape[1]) - first.gather(1, expert)  # [L, R]
    out = torch.full((layers, num_logical * width), -1, dtype=torch.int64)
    return out.scatter_(1, expert * width + rank, order).view(layers, num_logical, width)


@contextlib.contextmanager
def _one_thread():
    # The search is thousands of small tensor ops: handing each to a second thread costs more
    # than it saves (several times slower on a 2-core host), so run it on the calling thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _checked(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """(`weight` as float64 on CPU, the four sizes as ints), or ValueError naming the bad value."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise ValueError(f"weight must hold real numbers, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, num_logical_experts], got shape "
                         f"{tuple(weight.shape)}")
    layers, num_logical = weight.shape
    if layers == 0 or num_logical == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    sizes = []
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        try:
            sizes.append(operator.index(value))
        except TypeError:
            sizes.append(None)
        if isinstance(value, bool) or sizes[-1] is None or sizes[-1] < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_replicas, num_groups, num_nodes, num_gpus = sizes
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    if num_logical % num_groups:
        raise ValueError(f"num_logical_experts={num_logical} is not a multiple of "
                         f"num_groups={num_groups}")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas={num_replicas} is fewer than the "
                         f"{num_logical} logical experts")
    w = weight.detach().to("cpu", torch.float64).contiguous()
    bad = ~torch.isfinite(w) | (w < 0)
    if bad.any():
        layer, expert = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight[{layer}, {expert}] = {w[layer, expert].item()} is not a "
                         f"finite non-negative load")
    if not math.isfinite(float(w.sum(1).max())):
        raise ValueError("weight sums overflow float64")
    return w, sizes
