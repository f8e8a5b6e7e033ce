"""Speculative decoding math: drafting from the MTP module's distribution and verifying drafts against the
target's. Pure tensor code, no engine state: the step's orchestration is engine/drafter.py's, and an accepted
run is cut where plain decoding stops by the engine appending it token by token (`Engine._append_run`).

Verification is standard speculative sampling (Leviathan et al.; Chen et al.): draft token x drawn from q is
kept with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from the residual
norm(max(0, p - q)); when every draft is kept a bonus token is drawn from the target's next distribution.
The emitted tokens are then distributed exactly as the target's. A greedy row's p is one-hot at the
target's argmax, so the same rule reduces to "accept while the argmax matches" and emits the argmax at the
first mismatch. Every uniform number is a counter-based hash of (request seed, token position, purpose), so
a seeded request draws the same numbers whatever its batch and wherever it resumes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rayinfer.engine.sampler import uniform_noise
from rayinfer.engine.sequence import Sequence

_M32 = 0xFFFFFFFF
# Purposes xored into the seed's high half so the draft, accept and resample draws at one position differ.
_DRAFT, _ACCEPT, _RESAMPLE = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


@dataclass
class Seeds:
    """Per-row counter state: the request seed's halves and the position of the row's first new token."""
    lo: torch.Tensor  # [B] int64
    hi: torch.Tensor  # [B] int64
    pos: torch.Tensor  # [B] int64

    @classmethod
    def of(cls, seeds: list[int], positions: list[int], device="cpu") -> "Seeds":
        t = torch.tensor([[s & _M32, (s >> 32) & _M32, p & _M32] for s, p in zip(seeds, positions)],
                         dtype=torch.int64, device=device).reshape(-1, 3)
        return cls(t[:, 0], t[:, 1], t[:, 2])

    def uniform(self, offset: int, purpose: int) -> torch.Tensor:
        """U(0, 1) [B] for the token at pos + offset, for one purpose."""
        return uniform_noise(self.lo, self.hi ^ purpose, (self.pos + offset) & _M32)


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [B, V] (any positive scale), u [B] -> the token [B] at which the scaled CDF passes u."""
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return pick.clamp(max=probs.shape[1] - 1).squeeze(1)


def draft_tokens(q: torch.Tensor, seeds: Seeds, offset: int, greedy: torch.Tensor) -> torch.Tensor:
    """q [B, V] the draft's filtered distribution for draft position `offset` -> the drafted token [B]:
    the argmax for greedy rows, a seeded draw from q otherwise."""
    return torch.where(greedy, q.argmax(dim=-1), _invert_cdf(q, seeds.uniform(offset, _DRAFT)))


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, seeds: Seeds,
           greedy_accept: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """p [B, k+1, V] target distributions at the k draft positions and the one after; q [B, k, V] the
    distributions the drafts [B, k] were drawn from -> (tokens [B, k+1], n_emit [B]): row b emits
    tokens[b, :n_emit[b]], 1 <= n_emit <= k+1 (its accepted drafts, then a corrected or bonus token).
    `greedy_accept` keeps a draft only when it is p's argmax: wrong for sampled rows, a negative control."""
    b, k1, v = p.shape
    k = k1 - 1
    assert q.shape == (b, k, v) and drafts.shape == (b, k), (p.shape, q.shape, drafts.shape)
    tokens = torch.empty(b, k1, dtype=torch.int64, device=p.device)
    alive = torch.ones(b, dtype=torch.bool, device=p.device)  # every draft so far accepted
    n_emit = torch.zeros(b, dtype=torch.int64, device=p.device)
    for j in range(k):
        x = drafts[:, j]
        px = p[:, j].gather(1, x[:, None]).squeeze(1)
        qx = q[:, j].gather(1, x[:, None]).squeeze(1)
        if greedy_accept:
            keep = p[:, j].argmax(dim=-1) == x
        else:
            keep = seeds.uniform(j, _ACCEPT) * qx < px  # u < p/q without dividing by a zero q
        residual = (p[:, j] - q[:, j]).clamp(min=0)
        empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q: any rejection is measure zero
        residual = torch.where(empty, p[:, j], residual)
        fixed = _invert_cdf(residual, seeds.uniform(j, _RESAMPLE))
        tokens[:, j] = torch.where(keep, x, fixed)
        n_emit += alive.long()
        alive &= keep
    bonus = _invert_cdf(p[:, k], seeds.uniform(k, _RESAMPLE))
    tokens[:, k] = bonus
    n_emit += alive.long()
    return tokens, n_emit


def verify_greedy(best: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify` for greedy rows without distributions: best [B, k+1] the target's argmax at the k draft positions
    and the one after, drafts [B, k] -> (tokens [B, k+1], n_emit [B]). Accepted drafts equal the argmax there, and
    the corrected or bonus token is the argmax after them, so the emitted tokens are the argmax row itself."""
    accepted = (best[:, :-1] == drafts).long().cumprod(dim=1).sum(dim=1)  # [B] leading matches
    return best, accepted + 1


def verify_views(seqs: list, drafts: list[list[int]]) -> list:
    """Each sequence followed by its drafts, one view per verified position (k + 1 per sequence, row-major):
    view j holds the sequence's tokens plus drafts[:j], so penalties and min_tokens see at draft position j
    the history plain decoding would have had there. Views share params and sample_seed, not token lists."""
    return [view(seq, d[:j]) for seq, d in zip(seqs, drafts) for j in range(len(d) + 1)]


def view(seq: Sequence, drafts: list[int]) -> Sequence:
    """`seq` as if `drafts` had been appended: what the filters see at the position after them."""
    v = Sequence(seq.request_id, seq.token_ids[:seq.num_prompt_tokens], seq.params)
    v.token_ids = seq.token_ids + list(drafts)
    v.sample_seed = seq.sample_seed
    return v
