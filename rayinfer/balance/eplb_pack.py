"""Replica counts and slot packing for the EPLB search (`eplb_search.place` drives these).

A row is one independent problem: expert loads `weight[b]` [n], and R slots over G GPUs with
S = R / G slots each. `pack` turns replica counts into a slot layout (optimal for S <= 2,
heaviest-first otherwise); `count_search` re-decides the counts by moving one replica from one
expert to another and re-packing every candidate, which captures what no single slot move
can: a changed count moves the load of every GPU that holds that expert, and re-packing
re-pairs all of them at once.
"""

import numpy as np
import torch

_INF = float("inf")
_TOL = 1e-12  # relative to the worst load: smaller differences count as equal


def water_fill(weight: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Replica counts [B, n] minimising the largest per-replica load (one extra at a time)."""
    rows, n = weight.shape
    cnt = torch.ones(rows, n, dtype=torch.int64)  # [B, n]
    row = torch.arange(rows)
    for _ in range(num_slots - n):
        cnt[row, (weight / cnt).argmax(1)] += 1
    return cnt


def pack(weight: torch.Tensor, cnt: torch.Tensor, num_gpus: int, pairs: bool = True):
    """(slots [B, R] expert of every slot, load [B, G]); GPU g owns slots [g*S, (g+1)*S).

    Replicas go heaviest first to the lightest GPU with a free slot (ties: stable order, lowest
    GPU), the published packing step. For S = 2 and `pairs`, the k-th heaviest is paired with
    the k-th lightest instead: the same loads in one sort, though among equal items it may pick
    other experts (the group step wants the published choice, so it passes pairs=False).
    """
    rows, n = weight.shape
    eid = torch.repeat_interleave(torch.arange(n).repeat(rows), cnt.flatten()).view(rows, -1)
    val = (weight / cnt).gather(1, eid)  # [B, R] load of every replica
    order = val.sort(dim=1, descending=True, stable=True).indices
    eid, val = eid.gather(1, order), val.gather(1, order)
    R = val.shape[1]
    S = R // num_gpus
    if S == 1:
        return eid, val
    if S == 2 and pairs:
        slots = torch.stack([eid[:, :num_gpus], eid[:, num_gpus:].flip(1)], -1)  # [B, G, 2]
        return slots.view(rows, R), val[:, :num_gpus] + val[:, num_gpus:].flip(1)
    gpu_of, load = _lpt(val, num_gpus, S)
    # Every GPU gets exactly S items, so listing items GPU by GPU (stable) yields the slots.
    return eid.gather(1, (gpu_of * R + torch.arange(R)).argsort(1)), load


def loads_of(val: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """GPU loads [B, G] that `pack` reaches for replica loads `val` [B, R] in any order."""
    val = _sorted_desc(val)
    S = val.shape[1] // num_gpus
    if S == 1:
        return val
    if S == 2:
        return val[:, :num_gpus] + val[:, num_gpus:].flip(1)
    return _lpt(val, num_gpus, S)[1]


def _sorted_desc(x: torch.Tensor) -> torch.Tensor:
    # numpy sorts rows of a few hundred floats several times faster than torch on CPU.
    return torch.from_numpy(-np.sort(-x.contiguous().numpy(), axis=-1))


def _lpt(val, num_gpus, S):
    """(GPU of every item [B, R], load [B, G]) for items sorted heaviest first, each sent to
    the lightest GPU that still has a free slot."""
    rows, R = val.shape
    base = torch.arange(rows) * num_gpus  # [B]
    load = torch.zeros(rows, num_gpus, dtype=val.dtype)  # [B, G]
    key = load.clone()  # [B, G] the load, or inf once the GPU is full
    fill = torch.zeros(rows * num_gpus, dtype=torch.int64)  # [B*G]
    gpu_of = torch.empty(rows, R, dtype=torch.int64)  # [B, R]
    full = torch.tensor([0.0, _INF], dtype=val.dtype)
    one = torch.ones(rows, dtype=torch.int64)
    for r in range(R):
        g = key.argmin(1)  # [B]
        gpu_of[:, r] = g
        lin = base + g
        fill.index_add_(0, lin, one)
        v = val[:, r]
        load.view(-1).index_add_(0, lin, v)
        key.view(-1).index_add_(0, lin, v + full[(fill[lin] >= S).long()])
    return gpu_of, load


def _smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    return score.topk(min(k, score.shape[1]), dim=1, largest=False, sorted=True).indices


def _candidates(weight, cnt, slots, load, num_gpus):
    """Experts to gain a replica [B, I] and to lose one [B, J] (heuristic short lists).

    Gainers: what sits on the worst GPU, the experts whose replicas would shrink the most, and
    the lightest experts (splitting those makes small replicas to sit beside heavy ones).
    Losers: the experts whose merged replica stays smallest; with S > 2 also the heaviest
    replicated expert on the worst GPU. Pairs (S = 2) re-pack by one sort, so their lists are
    longer; the lengths were tuned on Zipf and lognormal loads for quality per second.
    """
    rows = slots.shape[0]
    S = slots.shape[1] // num_gpus
    c = cnt.to(weight.dtype)
    on_max = slots.view(rows, num_gpus, S)[torch.arange(rows), load.argmax(1)]  # [B, S]
    merged = torch.where(c > 1, weight / (c - 1).clamp_min(1), _INF)
    lightest = weight / (c + 1)
    relief = _smallest(-weight / (c * (c + 1)), 2)
    if S <= 2:
        return torch.cat([on_max, relief, _smallest(lightest, 4)], 1), _smallest(merged, 6)
    spare_w = torch.where(cnt.gather(1, on_max) > 1, weight.gather(1, on_max), -1.0)
    heavy_on_max = on_max.gather(1, spare_w.argmax(1, keepdim=True))
    return (torch.cat([on_max[:, :3], relief, _smallest(lightest, 2)], 1),
            torch.cat([_smallest(merged, 2), heavy_on_max], 1))


def _lex_key(cur, cand):
    """Rank candidates by GPU loads sorted worst first, compared lexicographically with `cur`.

    cur [b, G] and cand [b, C, G] are sorted descending. A candidate improves if at the first
    load where it differs it is lower; of two improving ones, the earlier difference wins (the
    lexicographically smaller), then the larger drop there. Non-improving -> inf. Comparing
    whole sorted vectors instead of the maximum lets the search cross plateaus where the
    worst GPU stays put while the ones below it get lighter.
    """
    scale = cur[:, :1, None]  # [b, 1, 1]
    diff = (cand - cur[:, None, :]) / scale.clamp_min(1e-300)  # [b, C, G]
    differs = diff.abs() > _TOL
    first = differs.to(torch.int8).argmax(2, keepdim=True)  # [b, C, 1]
    drop = diff.gather(2, first)[..., 0]  # [b, C], in (-1, 1)
    # The worst load itself must not grow at all, not even within the tolerance.
    ok = differs.any(2) & (drop < 0) & (cand[:, :, 0] <= cur[:, None, 0])
    return torch.where(ok, first[..., 0] + drop / 2, _INF)


def count_search(weight, cnt, num_gpus, max_steps=64):
    """Move single replicas between experts while the re-packed GPU loads improve (leximax)."""
    rows, n = weight.shape
    cnt = cnt.clone()
    active = torch.arange(rows)
    for _ in range(max_steps):
        if not active.numel():
            break
        w, c = weight[active], cnt[active]
        slots, load = pack(w, c, num_gpus)
        gain, lose = _candidates(w, c, slots, load, num_gpus)
        gi = gain[:, :, None].expand(-1, -1, lose.shape[1]).flatten(1)  # [b, C] gains one
        lj = lose[:, None, :].expand(-1, gain.shape[1], -1).flatten(1)  # [b, C] loses one
        b, C = gi.shape
        ok = (gi != lj) & (c.gather(1, lj) > 1)  # [b, C]
        # A candidate's replica loads: the current ones (expert-major), with i's and j's
        # replaced and j's first slot handed to i. No change where not ok.
        cf = c.to(w.dtype)
        eid = torch.repeat_interleave(torch.arange(n).repeat(b), c.flatten()).view(b, -1)
        first = (c.cumsum(1) - c).gather(1, lj)  # [b, C] j's first slot
        w_i, c_i, w_j, c_j = w.gather(1, gi), cf.gather(1, gi), w.gather(1, lj), cf.gather(1, lj)
        x_i = torch.where(ok, w_i / (c_i + 1), w_i / c_i)  # [b, C]
        x_j = torch.where(ok, w_j / (c_j - 1).clamp_min(1), w_j / c_j)
        val = (w / cf).gather(1, eid)[:, None, :].expand(-1, C, -1)  # [b, C, R]
        val = torch.where(eid[:, None, :] == gi[:, :, None], x_i[:, :, None], val)
        val = torch.where(eid[:, None, :] == lj[:, :, None], x_j[:, :, None], val)
        val = val.scatter(2, first[:, :, None], torch.where(ok, x_i, x_j)[:, :, None])
        cload = loads_of(val.reshape(b * C, -1), num_gpus).view(b, C, -1)  # [b, C, G]
        key = _lex_key(_sorted_desc(load), _sorted_desc(cload))
        best, pick = key.min(1)
        improved = best < _INF
        sel, p = improved.nonzero().flatten(), pick[improved]
        c = c[sel]
        c.scatter_add_(1, gi[sel, p][:, None], torch.ones_like(c[:, :1]))
        c.scatter_add_(1, lj[sel, p][:, None], -torch.ones_like(c[:, :1]))
        cnt[active[sel]] = c
        active = active[sel]
    return cnt
