"""EPLB benchmark: rayinfer's expert placement against DeepSeek's published greedy policy.

For seeded Zipf and lognormal expert loads at DeepSeek's serving shapes (256 experts, 288
slots: prefill EP32 on 4 nodes -> hierarchical, decode EP144 on 18 nodes -> global) and a few
small shapes, prints the balancedness (max GPU load / mean GPU load, mean over layers) of
  ours      rayinfer.balance.eplb.rebalance_experts
  greedy    a port of the published policy (benchmarks/_greedy_eplb.py), same run, same loads
  no-red    no redundancy: every expert once, heaviest first onto the lightest GPU with room
  bound     a balancedness no placement can beat (largest replica; heaviest node if hier)
with ours/greedy, the wall time of both for all layers (best of --repeats), and how many
replicas share a GPU with another copy of their expert (allowed by both policies).

    python benchmarks/eplb.py            # 61 layers, best of 3 timings
    python benchmarks/eplb.py --quick    # 8 layers, one timing
"""

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch

from rayinfer.balance.eplb import balancedness, rebalance_experts

CASES = [  # name, experts, slots, groups, nodes, GPUs
    ("prefill EP32", 256, 288, 8, 4, 32),
    ("decode EP144", 256, 288, 8, 18, 144),
    ("EP16 64e", 64, 80, 8, 2, 16),
    ("EP12 64e", 64, 96, 8, 3, 12),
    ("EP8 12e", 12, 16, 4, 2, 8),
]
LOADS = [("zipf s=0.8", "zipf", 0.8), ("zipf s=1.2", "zipf", 1.2),
         ("lognorm s=0.5", "lognormal", 0.5), ("lognorm s=1.0", "lognormal", 1.0)]
TOKENS_PER_LAYER = 1_000_000


def _load_port():
    path = Path(__file__).with_name("_greedy_eplb.py")
    spec = importlib.util.spec_from_file_location("_greedy_eplb", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.greedy_rebalance


def make_loads(kind: str, param: float, layers: int, experts: int, seed: int) -> torch.Tensor:
    """Token counts per expert [layers, experts]: Zipf(param) ranks or lognormal(0, param)
    shares, shuffled per layer, sampled as Poisson counts of TOKENS_PER_LAYER routed tokens."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "zipf":
        base = torch.arange(1, experts + 1, dtype=torch.float64) ** -param  # [E]
        share = torch.stack([base[torch.randperm(experts, generator=gen)] for _ in range(layers)])
    else:
        share = (torch.randn(layers, experts, generator=gen, dtype=torch.float64) * param).exp()
    share = share / share.sum(1, keepdim=True)  # [L, E]
    return torch.poisson(share * TOKENS_PER_LAYER, generator=gen)


def no_redundancy(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Balancedness [L] with every expert placed once, at most ceil(E/G) experts per GPU."""
    layers, experts = weight.shape
    room = -(-experts // num_gpus)
    w = weight.double()
    load = torch.zeros(layers, num_gpus, dtype=torch.float64)  # [L, G]
    fill = torch.zeros(layers, num_gpus, dtype=torch.int64)  # [L, G]
    row = torch.arange(layers)
    for e in w.sort(1, descending=True).indices.T:  # heaviest first, one expert per layer
        g = load.masked_fill(fill >= room, float("inf")).argmin(1)
        load[row, g] += w[row, e]
        fill[row, g] += 1
    mean = load.mean(1)
    return torch.where(mean > 0, load.max(1).values / mean.clamp_min(1e-300), 1.0)


def bound(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
          num_gpus: int) -> torch.Tensor:
    """Balancedness no placement can beat [L]: the largest replica (water-filling minimises
    it) and, for the hierarchical policy, the node holding the heaviest group (it also holds
    the lightest other groups at best), each over the mean GPU load; at least 1."""
    w = weight.double()
    cnt = torch.ones_like(w)
    row = torch.arange(w.shape[0])
    for _ in range(num_replicas - w.shape[1]):
        cnt[row, (w / cnt).argmax(1)] += 1
    worst = (w / cnt).max(1).values  # [L]
    if num_groups % num_nodes == 0:
        groups = w.view(w.shape[0], num_groups, -1).sum(-1).sort(1).values  # [L, groups]
        per_node = num_groups // num_nodes
        node = groups[:, -1] + groups[:, :per_node - 1].sum(1)
        worst = torch.maximum(worst, node / (num_gpus // num_nodes))
    mean = w.sum(1) / num_gpus
    return torch.where(mean > 0, worst / mean.clamp_min(1e-300), 1.0).clamp_min(1)


def shared_copies(phy2log: torch.Tensor, num_gpus: int) -> int:
    """Replicas that sit on a GPU already holding a copy of the same expert (all layers)."""
    blocks = phy2log.view(phy2log.shape[0], num_gpus, -1).sort(-1).values
    return int((blocks[..., 1:] == blocks[..., :-1]).sum())


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 layers, one timing per run")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers (default 61)")
    parser.add_argument("--repeats", type=int, default=None, help="timings, best kept (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layers = args.layers or (8 if args.quick else 61)
    repeats = args.repeats or (1 if args.quick else 3)
    greedy = _load_port()

    print(f"EPLB balancedness (max/mean GPU load, mean of {layers} layers), best of {repeats} "
          f"timings; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    head = (f"{'case':<13} {'policy':<6} {'loads':<13} {'ours':>7} {'greedy':>7} {'no-red':>7} "
            f"{'bound':>7} {'o/g':>6} {'ours ms':>8} {'greedy ms':>9} {'speedup':>7} "
            f"{'shared o/g':>10}")
    print(head)
    print("-" * len(head))
    ratios, worst_ms = [], {}
    for case, (name, experts, slots, groups, nodes, gpus) in enumerate(CASES):
        policy = "hier" if groups % nodes == 0 else "global"
        for k, (label, kind, param) in enumerate(LOADS):
            w = make_loads(kind, param, layers, experts, seed=args.seed + 100 * case + k)
            (phy, _, cnt), t_ours = timed(
                lambda: rebalance_experts(w, slots, groups, nodes, gpus), repeats)
            (g_phy, g_cnt), t_greedy = timed(lambda: greedy(w, slots, groups, nodes, gpus), repeats)
            ours = balancedness(w, phy, cnt, gpus).mean().item()
            theirs = balancedness(w, g_phy, g_cnt, gpus).mean().item()
            ratios.append(ours / theirs)
            worst_ms[name] = max(worst_ms.get(name, 0.0), t_ours * 1e3)
            print(f"{name:<13} {policy:<6} {label:<13} {ours:7.4f} {theirs:7.4f} "
                  f"{no_redundancy(w, gpus).mean().item():7.4f} "
                  f"{bound(w, slots, groups, nodes, gpus).mean().item():7.4f} {ours / theirs:6.3f} "
                  f"{t_ours * 1e3:8.1f} {t_greedy * 1e3:9.1f} {t_greedy / t_ours:7.2f} "
                  f"{shared_copies(phy, gpus):>5}/{shared_copies(g_phy, gpus):<4}")
    geo = torch.tensor(ratios).log().mean().exp().item()
    print(f"\nours/greedy balancedness: geometric mean {geo:.4f}, best {min(ratios):.4f}, "
          f"worst {max(ratios):.4f}")
    print("slowest run of ours per shape (ms): "
          + ", ".join(f"{name} {ms:.0f}" for name, ms in worst_ms.items()))


if __name__ == "__main__":
    main()
