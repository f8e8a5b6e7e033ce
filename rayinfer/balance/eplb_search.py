"""Local search on a slot layout, and `place`, the per-pool EPLB solver (`eplb.py` drives it).

A row is one independent pool: expert loads `w[b]` [n], R slots over G GPUs with S = R / G slots
each (GPU g owns slots [g*S, (g+1)*S)). `place` picks replica counts (at least one per expert)
and a slot for every replica so that the most loaded GPU is as light as it can find, a replica
carrying its expert's load divided by the expert's replica count. Replicas of one expert may
share a GPU, as in the published policy: the load model charges that GPU exactly what it
receives, so forbidding it could only make the worst GPU heavier. Such copies are wasted
memory, though, so `spread` swaps them apart wherever the worst GPU stays as light.

Pipeline: water-filling counts (what the published policy stops at) -> `count_search`
(re-decides counts, re-packing each candidate) -> `pack` -> `local_search` (moves load off each
row's worst GPU) -> `spread` (separates co-located copies where that costs nothing). No stage
lets a row's worst GPU get heavier, so the result is never worse than packing the water-filled
counts, which is what the published policy returns for the same pool. Every step works on
all rows at once with batched torch ops: Python loops once per step, not once per layer.
"""

import torch

from rayinfer.balance.eplb_pack import count_search, pack, water_fill

_INF = float("inf")
_TOL = 1e-12  # relative: a move must lower the worst affected GPU by more than rounding


def _per_expert_max(val: torch.Tensor, eid: torch.Tensor, n: int, empty=-_INF) -> torch.Tensor:
    """Max of `val` [B, R] over the slots of each expert -> [B, n] (`empty` where none)."""
    init = torch.full((val.shape[0], n), empty, dtype=val.dtype)
    return init.scatter_reduce(1, eid, val, "amax")


def _step(w, cnt, slots, num_gpus, fixed_counts):
    """One best-improvement move per row; returns (improved [B] bool, new slots, new cnt).

    Moves, all anchored on the row's worst GPU g*: swap a g* slot with any other slot; give
    the expert of a g* slot one more replica in place of a replica elsewhere; turn a g* slot
    into a replica of any other expert. A move is taken only if every GPU it touches ends
    below g*'s old load (an upper bound is used where exact is costly), so the worst load, or
    the number of GPUs at it, falls every step.
    """
    rows, n = w.shape
    R = slots.shape[1]
    S = R // num_gpus
    gpu = torch.arange(R) // S  # [R] GPU of every slot
    c = cnt.gather(1, slots).to(w.dtype)  # [B, R] replica count of each slot's expert
    ws = w.gather(1, slots)  # [B, R] load of each slot's expert
    a = ws / c  # [B, R] load carried by each slot
    load = a.view(rows, num_gpus, S).sum(-1)  # [B, G]
    lmax, gmax = load.max(1)  # [B]
    gslots = gmax[:, None] * S + torch.arange(S)  # [B, S] slots of g*
    on_g = gpu[None, :] == gmax[:, None]  # [B, R]
    lh = load[:, gpu]  # [B, R] load of each slot's GPU
    eg, ag = slots.gather(1, gslots), a.gather(1, gslots)  # [B, S]
    lm = lmax[:, None, None]

    # Swap: only g* and the other slot's GPU change.
    d = a[:, None, :] - ag[:, :, None]  # [B, S, R]
    swap = torch.maximum(lm + d, lh[:, None, :] - d).masked_fill(on_g[:, None, :], _INF)
    if fixed_counts:
        val, idx = swap.flatten(1).min(1)
        improved = val < lmax * (1 - _TOL)
        return improved, *_apply(slots, cnt, gslots, eg, idx, improved, n)

    blocks = slots.view(rows, num_gpus, S)
    nsame = (blocks[:, :, :, None] == blocks[:, :, None, :]).sum(-1).view(rows, R)  # [B, R]
    n_on_g = (slots[:, :, None] == eg[:, None, :]).sum(-1)  # [B, R] copies on g* of slot's expert
    up = torch.where(c > 1, ws / (c * (c - 1)).clamp_min(1), _INF)  # [B, R] rise if one is lost
    # Every other GPU holding expert j rises by up_j per copy when j loses a replica; for a
    # slot k on GPU h the bound needs the worst of them except g* and h: keep the top two.
    rise = (lh + nsame * up).masked_fill(on_g, -_INF)  # [B, R]
    top1 = _per_expert_max(rise, slots, n)  # [B, n]
    arg1 = _per_expert_max(torch.where(rise == top1.gather(1, slots), gpu, -1), slots, n, -1)
    at_top = gpu[None, :] == arg1.gather(1, slots)  # [B, R]
    top2 = _per_expert_max(rise.masked_fill(at_top, -_INF), slots, n)  # [B, n]
    others = torch.where(at_top, top2.gather(1, slots), top1.gather(1, slots))  # [B, R]

    # Grow: the expert i of g* slot s gains a replica in place of slot k (expert j) elsewhere.
    n_i = n_on_g.gather(1, gslots).to(w.dtype)  # [B, S]
    w_i, c_i = ws.gather(1, gslots), c.gather(1, gslots)  # [B, S]
    new_g = lm - (n_i * w_i / (c_i * (c_i + 1)))[:, :, None] + (n_on_g * up)[:, None, :]
    new_h = (lh - a + (nsame - 1) * up)[:, None, :] + (w_i / (c_i + 1))[:, :, None]
    grow = torch.maximum(torch.maximum(new_g, new_h), others[:, None, :])  # [B, S, R]
    bad = on_g[:, None, :] | (slots[:, None, :] == eg[:, :, None]) | (c[:, None, :] < 2)
    grow = grow.masked_fill(bad, _INF)

    # Convert: g* slot s (expert j) becomes a replica of any expert i.
    cn = cnt.to(w.dtype)  # [B, n]
    n_ig = torch.zeros(rows, n, dtype=w.dtype).scatter_add_(1, eg, torch.ones_like(ag))  # [B, n]
    i_term = w / (cn + 1) - n_ig * w / (cn * (cn + 1))  # [B, n] g*'s change from i
    up_g = up.gather(1, gslots)  # [B, S]
    j_term = lm[:, :, 0] - ag + (n_i - 1) * up_g  # [B, S] g* without s, j's other copies risen
    conv = torch.maximum(j_term[:, :, None] + i_term[:, None, :], top1.gather(1, eg)[:, :, None])
    bad = (eg[:, :, None] == torch.arange(n)) | (up_g == _INF)[:, :, None]
    conv = conv.masked_fill(bad, _INF)  # [B, S, n]

    val, idx = torch.cat([swap.flatten(1), grow.flatten(1), conv.flatten(1)], 1).min(1)
    improved = val < lmax * (1 - _TOL)
    return improved, *_apply(slots, cnt, gslots, eg, idx, improved, n)


def _apply(slots, cnt, gslots, eg, idx, improved, n):
    """Carry out each improved row's chosen move (index into the concatenated candidates)."""
    R = slots.shape[1]
    S = gslots.shape[1]
    slots, cnt = slots.clone(), cnt.clone()
    b = improved.nonzero().flatten()
    idx, gs, e_g, old = idx[b], gslots[b], eg[b], slots[b]
    kind = (idx >= S * R).long() + (idx >= 2 * S * R).long()
    s_sw, k_sw = (idx // R).clamp_max(S - 1), idx % R  # swap: g* slot s <-> slot k
    s_gr, k_gr = ((idx - S * R) // R).clamp(0, S - 1), (idx - S * R) % R  # grow: slot k -> i
    s_cv, i_cv = ((idx - 2 * S * R) // n).clamp(0, S - 1), (idx - 2 * S * R) % n  # convert
    col = lambda t, j: t.gather(1, j[:, None])[:, 0]
    p1 = torch.where(kind == 0, col(gs, s_sw), torch.where(kind == 1, k_gr, col(gs, s_cv)))
    v1 = torch.where(kind == 0, col(old, k_sw), torch.where(kind == 1, col(e_g, s_gr), i_cv))
    p2 = torch.where(kind == 0, k_sw, p1)
    v2 = torch.where(kind == 0, col(old, p1), v1)
    moved = (kind > 0).long()[:, None]
    c = cnt[b]
    c.scatter_add_(1, col(old, p1)[:, None], -moved).scatter_add_(1, v1[:, None], moved)
    new = old.scatter(1, p2[:, None], v2[:, None]).scatter(1, p1[:, None], v1[:, None])
    slots[b], cnt[b] = new, c
    return slots, cnt


def local_search(w, cnt, slots, num_gpus, fixed_counts=False, max_steps=None):
    """Improve rows until no move lowers their worst GPU, or `max_steps` (default 2R)."""
    active = torch.arange(w.shape[0])
    for _ in range(max_steps if max_steps is not None else 2 * slots.shape[1]):
        if not active.numel():
            break
        improved, s_new, c_new = _step(w[active], cnt[active], slots[active], num_gpus,
                                       fixed_counts)
        slots[active], cnt[active] = s_new, c_new
        active = active[improved]
    return slots, cnt


def spread(w, cnt, slots, num_gpus):
    """Swap co-located replicas apart while the worst GPU of the row gets no heavier."""
    rows, n = w.shape
    R = slots.shape[1]
    S = R // num_gpus
    gpu = torch.arange(R) // S  # [R]
    later = torch.ones(S, S, dtype=torch.bool).tril(-1)  # [S, S] slot j before slot i
    active = torch.arange(rows)
    for _ in range(R):
        s = slots[active]
        b = s.shape[0]
        blocks = s.view(b, num_gpus, S)
        dup = ((blocks[..., :, None] == blocks[..., None, :]) & later).any(-1).view(b, R)
        keep = dup.any(1)
        if not keep.any():
            break
        active, s, dup, b = active[keep], s[keep], dup[keep], int(keep.sum())
        a = (w[active] / cnt[active]).gather(1, s)  # [b, R]
        load = a.view(b, num_gpus, S).sum(-1)  # [b, G]
        holds = torch.zeros(b, num_gpus * n, dtype=torch.bool)
        holds.scatter_(1, gpu * n + s, True)  # [b, G*n] GPU g holds expert e
        k = dup.to(torch.int8).topk(int(dup.sum(1).max()), 1).indices  # [b, K] some dup slots
        gk, ek, ak = gpu[k], s.gather(1, k), a.gather(1, k)  # [b, K]
        # Slot m may trade places with dup slot k if neither expert then meets a copy of itself.
        m_on_k = holds.gather(1, (gk[:, :, None] * n + s[:, None, :]).flatten(1))  # [b, K*R]
        k_on_m = holds.gather(1, (gpu * n + ek[:, :, None]).flatten(1))  # [b, K*R]
        ok = dup.gather(1, k)[:, :, None] & ~(m_on_k | k_on_m).view(b, -1, R)  # [b, K, R]
        new_k = load.gather(1, gk)[:, :, None] - ak[:, :, None] + a[:, None, :]  # [b, K, R]
        new_m = load[:, gpu][:, None, :] - a[:, None, :] + ak[:, :, None]
        worst = torch.maximum(new_k, new_m)
        ok = ok & (worst <= load.max(1).values[:, None, None])
        val, idx = worst.masked_fill(~ok, float("inf")).flatten(1).min(1)
        moved = val < float("inf")
        if not moved.any():
            break
        sel = moved.nonzero().flatten()
        src = k[sel].gather(1, (idx[sel] // R)[:, None])[:, 0]
        dst = idx[sel] % R
        new = s[sel]
        e_src, e_dst = new.gather(1, src[:, None]), new.gather(1, dst[:, None])
        new = new.scatter(1, src[:, None], e_dst).scatter(1, dst[:, None], e_src)
        slots[active[sel]] = new
        active = active[moved]
    return slots


def place(weight: torch.Tensor, num_slots: int, num_gpus: int) -> torch.Tensor:
    """Slot -> expert map [B, num_slots] for each row of `weight` [B, n] (float64)."""
    # Pairs re-pack in one sort; heavier packing runs a step per slot, so cap its rounds.
    rounds = 64 if num_slots <= 2 * num_gpus else min(64, max(8, 4096 // num_slots))
    cnt = count_search(weight, water_fill(weight, num_slots), num_gpus, max_steps=rounds)
    slots, _ = pack(weight, cnt, num_gpus)
    slots, cnt = local_search(weight, cnt, slots, num_gpus)
    return spread(weight, cnt, slots, num_gpus)
