"""Next-token selection from a step's logits: penalties, min_tokens, temperature, top-k/top-p/min-p, logprobs.

Everything runs on the logits' device as whole-batch tensor ops (no per-row loop, so the op count
does not grow with the batch), and the only host sync is the one transfer of the results.
Greedy rows take the argmax. Random rows sample by inverting their filtered distribution's CDF
at one uniform number per row, which is counter-based: a hash of (request seed, token position).
A row's tokens therefore depend on nothing else in the batch, and a request resumed elsewhere
from its emitted tokens samples the same continuation with no RNG state carried. (One number per
row, not one per vocab entry: hashing the whole vocabulary cost more than the model on a CPU.) Unseeded
requests draw a seed when first sampled (`Sequence.sample_seed`), from the engine's seed.
Logprobs are those of the model's raw distribution (before penalties and temperature), as the
OpenAI API reports them.
"""
from __future__ import annotations

import random

import torch

from rayinfer.engine.sequence import Sequence

_M32 = 0xFFFFFFFF
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), by 16-bit halves of c so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (xor-shift-multiply), elementwise on int64 in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """U(0, 1) [B], a pure function of each row's (seed, position); 24 bits, what float32 resolves."""
    key = mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ pos)
    return ((key >> 8).float() + 0.5) * 2.0 ** -24


class Sampler:
    def __init__(self, seed: int, device: torch.device | str = "cpu", eos_token_ids=()):
        self.seeds = random.Random(seed)  # seeds for unseeded requests
        self.device = torch.device(device)
        self.eos = sorted(eos_token_ids)
        self.grammar = None  # engine.grammar.Grammars, attached where the rank has a tokenizer

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [B, V] for the sequences `seqs` (one row each) -> (token per row, logprobs per row)."""
        rows = self.sample(logits, seqs).cpu().tolist()  # the step's one device -> host transfer
        tokens = [int(r[0]) for r in rows]
        out = []
        for r, s in zip(rows, seqs):
            k = s.params.logprobs
            if k is None:
                out.append(None)
                continue
            width = (len(r) - 2) // 2
            lp = {int(r[0]): r[1]}
            lp.update(zip(map(int, r[2:2 + k]), r[2 + width:2 + width + k]))
            out.append(lp)
        return tokens, out

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Stays on the logits' device: [B, 2 + 2K] float64 rows of (token, its logprob, K top ids, K top
        logprobs), K the largest `logprobs` asked in the batch; [B, 1] (the tokens) when none asked."""
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (tuple(logits.shape), len(seqs))
        params = [s.params for s in seqs]
        self.assign_seeds(seqs)
        dev = logits.device
        logits = logits.float()
        k_max = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        raw_lp = torch.log_softmax(logits, dim=-1) if k_max is not None else None
        random = not all(p.greedy for p in params)
        f = None  # per-row float parameters, built only when penalties or sampling need them
        if random or any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in params):
            f = torch.tensor([[getattr(p, name) for name in _FLOATS] for p in params], dtype=torch.float32).to(dev)
        logits = self.filter_logits(logits, seqs, f)
        tokens = logits.argmax(dim=-1)
        if random:
            seeds = [s.sample_seed & (2 ** 64 - 1) for s in seqs]
            ints = torch.tensor([[sd & _M32, sd >> 32, s.num_tokens & _M32, s.params.top_k]
                                 for sd, s in zip(seeds, seqs)], dtype=torch.int64).to(dev)
            probs, order = self._filtered_probs(logits, f, ints[:, 3], params)
            cdf = probs.cumsum(dim=-1)  # [B, V]
            u = uniform_noise(ints[:, 0], ints[:, 1], ints[:, 2])
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[1] - 1)
            sampled = (order.gather(1, pick) if order is not None else pick).squeeze(1)
            tokens = torch.where(f[:, 0] == 0, tokens, sampled)
        if raw_lp is None:
            return tokens[:, None].double()
        chosen = raw_lp.gather(1, tokens[:, None])
        vals, ids = raw_lp.topk(k_max, dim=-1)
        return torch.cat([tokens[:, None].double(), chosen.double(), ids.double(), vals.double()], dim=1)

    def filter_logits(self, logits: torch.Tensor, seqs: list[Sequence], f: torch.Tensor | None = None):
        """Everything that reshapes a row's logits before selection (penalties, min_tokens, logit_bias, grammar): the one
        entry point every path that selects tokens goes through, so none can bypass a request's constraints."""
        if f is None and any(s.params.presence_penalty or s.params.frequency_penalty
                             or s.params.repetition_penalty != 1 for s in seqs):
            f = torch.tensor([[getattr(s.params, n) for n in _FLOATS] for s in seqs], dtype=torch.float32)
            f = f.to(logits.device)
        logits = self._logit_bias(self._min_tokens(self._penalise(logits, seqs, f), seqs), seqs)
        if any(s.params.structured for s in seqs):
            if self.grammar is None:
                raise ValueError("structured output needs the checkpoint's tokenizer on this rank")
            logits = self.grammar.mask(logits, seqs)
        return logits

    @staticmethod
    def _logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias]
        if not rows:
            return logits
        idx = torch.tensor([[i, t] for i, t, _ in rows], dtype=torch.int64).to(logits.device)
        bias = torch.tensor([b for _, _, b in rows], dtype=logits.dtype).to(logits.device)
        return logits.index_put((idx[:, 0], idx[:, 1]), bias, accumulate=True)

    def assign_seeds(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if s.sample_seed is None:
                s.sample_seed = s.params.seed if s.params.seed is not None else self.seeds.getrandbits(64)

    def target_probs(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The distribution `sample` draws from, [B, V] in vocab order and normalised (penalties, min_tokens,
        logit_bias, grammar, temperature, top-k/p, min-p applied); a greedy row is one-hot at its argmax.
        Speculative verification accepts against this, so every filter applies under speculation as without it."""
        params = [s.params for s in seqs]
        logits = logits.float()
        f = torch.tensor([[getattr(p, name) for name in _FLOATS] for p in params],
                         dtype=torch.float32).to(logits.device)
        logits = self.filter_logits(logits, seqs, f)  # logit_bias and grammar masks too
        greedy = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[1]).float()
        if all(p.greedy for p in params):
            return greedy
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=logits.device)
        probs, order = self._filtered_probs(logits, f, top_k, params)
        if order is not None:
            probs = torch.zeros_like(logits).scatter_(1, order, probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        return torch.where(f[:, 0:1] == 0, greedy, probs)

    def _penalise(self, logits: torch.Tensor, seqs: list[Sequence], f: torch.Tensor) -> torch.Tensor:
        """vLLM's order: repetition (prompt or output tokens: positive logits divided, negative multiplied),
        then frequency and presence (output tokens only)."""
        pen = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty
               or s.params.repetition_penalty != 1.0]
        if not pen:
            return logits
        b, v = logits.shape
        out_rows, out_toks = self._flat([(i, seqs[i].output_token_ids) for i in pen], logits.device)
        counts = torch.zeros(b, v, device=logits.device).index_put_(
            (out_rows, out_toks), torch.ones((), device=logits.device), accumulate=True)
        seen = counts > 0
        rep_rows = [(i, seqs[i].token_ids[:seqs[i].num_prompt_tokens]) for i in pen
                    if seqs[i].params.repetition_penalty != 1.0]
        if rep_rows:
            prompt = torch.zeros(b, v, dtype=torch.bool, device=logits.device)
            prompt[self._flat(rep_rows, logits.device)] = True
            rep = f[:, 5:6]
            logits = torch.where(seen | prompt, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - f[:, 4:5] * counts - f[:, 3:4] * seen

    def _min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Before min_tokens outputs, no token that would stop the request may be sampled."""
        rows = [(i, list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else self.eos))
                for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        rows = [(i, ids) for i, ids in rows if ids]
        if not rows:
            return logits
        return logits.index_put(self._flat(rows, logits.device), torch.tensor(float("-inf"), device=logits.device))

    @staticmethod
    def _flat(rows: list[tuple[int, list[int]]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token ids) pairs -> flat (row index, token index) tensors on `device`, in one copy."""
        flat = torch.tensor([[i, t] for i, ids in rows for t in ids], dtype=torch.int64).reshape(-1, 2).to(device)
        return flat[:, 0], flat[:, 1]

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, f: torch.Tensor, top_k: torch.Tensor, params):
        """Probabilities after temperature, top-k, top-p and min-p (not renormalised: the CDF is scaled
        by its total), in descending order with the vocab ids of that order when a row asked for
        top-k or top-p, else in vocab order with None."""
        temp = torch.where(f[:, 0:1] == 0, 1.0, f[:, 0:1])  # greedy rows are computed, then ignored
        logits = logits / temp
        v = logits.shape[1]
        order = None
        random = [p for p in params if not p.greedy]
        if all(0 < p.top_k < v for p in random):  # the k best suffice: O(V) instead of a full sort
            logits, order = logits.topk(max(p.top_k for p in random), dim=-1)
        elif any(0 < p.top_k < v or p.top_p < 1 for p in random):
            logits, order = logits.sort(dim=-1, descending=True)
        if order is not None:
            k = torch.where((top_k > 0) & (top_k < logits.shape[1]), top_k, logits.shape[1])
            kth = logits.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th value stay
        probs = logits.softmax(dim=-1)
        if order is not None:
            top_p = f[:, 1:2]
            drop = ((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1)  # smallest prefix reaching top_p
            probs = probs.masked_fill(drop, 0.0)
        min_p = f[:, 2:3]
        return probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0), order
