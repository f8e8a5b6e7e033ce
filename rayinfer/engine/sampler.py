"""Next-token selection from a step's logits: penalties, temperature, top-k/top-p/min-p, logprobs.

Greedy rows take the argmax. Random rows sample by the exponential race (argmax of p / E with
E ~ Exp(1)), drawn from the request's own generator when it has a seed, so a seeded request
samples the same tokens whatever else is in the batch. Logprobs are those of the model's raw
distribution (before penalties and temperature), as the OpenAI API reports them.
"""
from __future__ import annotations

import torch

from rayinfer.engine.sequence import Sequence


class Sampler:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [B, V] for the sequences `seqs` (one row each) -> (token per row, logprobs per row)."""
        logits = logits.float()
        raw_lp = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        logits = self._penalise(logits, seqs)
        tokens = logits.argmax(dim=-1)  # [B]
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            probs = self._filtered_probs(logits[random_rows], [seqs[i] for i in random_rows])  # [R, V]
            noise = torch.empty_like(probs)
            for r, i in enumerate(random_rows):
                seq = seqs[i]
                if seq.params.seed is not None and seq.generator is None:
                    seq.generator = torch.Generator().manual_seed(seq.params.seed)
                noise[r].exponential_(generator=seq.generator or self.generator)
            tokens[random_rows] = (probs / noise).argmax(dim=-1)
        out = tokens.tolist()
        return out, [self._logprobs(raw_lp[i], out[i], s.params.logprobs) if raw_lp is not None and
                     s.params.logprobs is not None else None for i, s in enumerate(seqs)]

    @staticmethod
    def _penalise(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p, out = seqs[i].params, seqs[i].output_token_ids
            if not out:
                continue
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[1])[: logits.shape[1]].float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs]).unsqueeze(1)
        logits = logits / temps
        v = logits.shape[1]
        top_k = [s.params.top_k if s.params.top_k > 0 else v for s in seqs]
        if min(top_k) < v:
            kth = torch.stack([logits[i].topk(min(k, v)).values[-1] for i, k in enumerate(top_k)]).unsqueeze(1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        top_p = torch.tensor([s.params.top_p for s in seqs]).unsqueeze(1)
        if (top_p < 1).any():
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
        min_p = torch.tensor([s.params.min_p for s in seqs]).unsqueeze(1)
        if (min_p > 0).any():
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        return probs

    @staticmethod
    def _logprobs(lp: torch.Tensor, token: int, k: int) -> dict[int, float]:
        out = {token: float(lp[token])}
        if k:
            vals, ids = lp.topk(k)
            out.update(zip(ids.tolist(), vals.tolist()))
        return out
