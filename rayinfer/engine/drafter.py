"""MTP speculative decoding inside a single-rank step: the one owner of the MTP module's KV cache and of each
sequence's drafting state (`Sequence.draft_state`).

A step, for every sequence the scheduler gave k > 0 draft slots: the MTP module first catches up on the target's
hidden states from the sequence's previous step (position p paired with the token at p + 1, which writes the
module's own KV at p); its last row proposes draft 1, and drafts 2..k chain the module on its own hidden state and
the draft before. Then one target forward runs every sequence's new tokens, a drafted sequence's being its last
token and its drafts, and `speculative.verify` accepts against the target's filtered distribution (`Sampler.
target_probs`). The target's hidden rows of the verified positions become the sequence's next `draft_state`, so
the module only ever catches up on verified tokens; what its chain wrote at draft positions is rewritten before it
is read. Sequences without drafts this step (prefill chunks, a first decode step after a KV import) sample as
plain decoding does, and are caught up on too, so they can draft from their next step on.

Crosses: a `SchedulerOutput` in; request id -> (token, logprobs), `Accepted` for a drafted sequence, or
`RequestFailed` out, as `ModelRunner.execute` returns. MTP pages are the target's page ids in a cache of their
own (not exported, not on disk): a prefix hit or an imported prompt reuses whatever they hold, which costs
acceptance, never exactness.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from rayinfer.config import ConfigError
from rayinfer.engine.sequence import Accepted
from rayinfer.engine.speculative import Seeds, draft_tokens, verify, verify_greedy, verify_views, view
from rayinfer.kernels.transfer import to_device
from rayinfer.messages import RequestFailed


@dataclass
class DraftState:
    start: int  # position of hidden's first row
    end: int  # first position after them
    hidden: torch.Tensor  # [end - start, H] the target's hidden states there, before its final norm


@dataclass
class _Draft:
    tokens: list[int]
    q: list  # [V] each: the distribution each draft was drawn from (None: a greedy draft, the argmax)


class MtpDrafter:
    def __init__(self, runner, k: int):
        model = runner.model
        if runner.ctx is not None:
            raise ConfigError("num_speculative_tokens: speculative decoding runs on a single-rank engine only so "
                              "far (not in an expert-parallel gang)")
        if not len(model.mtp):
            raise ConfigError(f"num_speculative_tokens={k}: the checkpoint {model.checkpoint_path!r} has no MTP "
                              f"module (model.layers.{model.cfg.num_hidden_layers}.*) to draft with")
        self.runner, self.k, self.mtp = runner, k, model.mtp[0]
        # Zeroed, not empty: a position the module never caught up on (a prefix hit, an imported prompt) must read
        # as finite numbers, or a NaN draft distribution would reach verification.
        self.kv = runner.kv_caches + [torch.zeros_like(runner.kv_caches[0])]

    @torch.inference_mode()
    def execute(self, sched) -> dict:
        r = self.runner
        if not sched.scheduled:
            return {}
        r.sampler.assign_seeds([s.seq for s in sched.scheduled if s.num_draft_tokens])
        drafts = self._propose(sched)
        items, firsts = [], []  # the step's forward items; each scheduled sequence's first item
        for s in sched.scheduled:
            firsts.append(len(items))
            d = drafts.get(s.seq.request_id)
            if d is None:
                items.append((s.seq, s.start, s.num_new_tokens))
            else:
                items += self._rows(s.seq, s.start, [s.seq.token_ids[s.start], *d.tokens])
        ids, batch = r.prepare(items)
        hidden = r.model.hidden_states(ids, batch)  # [T, H]
        ends = batch.last_rows()
        first_rows = [ends[i] - items[i][2] + 1 for i in firsts]  # row of each sequence's first new token
        plain_rows, plain, by_k = [], [], defaultdict(list)
        for s, row in zip(sched.scheduled, first_rows):
            d = drafts.get(s.seq.request_id)
            if d is not None:
                by_k[len(d.tokens)].append((s.seq, d, row))
            elif s.samples:
                plain_rows.append(row + s.num_new_tokens - 1)
                plain.append(s.seq)
        out = {}
        if plain:
            out.update(r._sample(r.model.logits(hidden[to_device(torch.tensor(plain_rows), r.device)]), plain))
        for group in by_k.values():
            out.update(self._verify(hidden, group))
        for s, first in zip(sched.scheduled, first_rows):
            res = out.get(s.seq.request_id)
            if isinstance(res, BaseException):
                continue
            rows = 1 + res.num_accepted if isinstance(res, Accepted) else s.num_new_tokens
            s.seq.draft_state = DraftState(s.start, s.start + rows, hidden[first:first + rows].clone())
        return out

    def _rows(self, seq, start: int, tokens: list[int]) -> list[tuple]:
        """Forward items for `tokens` at positions start.. of `seq`: a few (a verify step's, a decode step's
        catch-up) each as a decode row of its own, so they run batched on plain decoding's attention path (as
        plain decoding computes them, and one call for the batch); a prefill chunk's as one item."""
        if len(tokens) > self.k + 1:
            return [(seq, start, len(tokens), tokens)]
        return [(seq, start + j, 1, tokens[j:j + 1]) for j in range(len(tokens))]

    def _mtp(self, hidden: torch.Tensor, items: list[tuple]) -> torch.Tensor:
        """The module over forward items whose tokens are each row's next token: hidden [T, H] -> its hidden
        [T, H], its KV written at those positions."""
        r = self.runner
        ids, batch = r.prepare(items)
        batch.kv_caches = self.kv  # the module's block indexes the cache one past the target's layers
        return self.mtp.propose(hidden, r.model.embed_tokens(ids), batch)

    def _propose(self, sched) -> dict[str, _Draft]:
        catch = []
        for s in sched.scheduled:
            st, s.seq.draft_state = s.seq.draft_state, None
            if st is not None and st.end == s.start:  # else stale (preempted, recomputed): never caught up on
                catch.append((s, st))
        if not catch:
            return {}
        r = self.runner
        x = self._mtp(r.model.norm(torch.cat([st.hidden for _, st in catch])),
                      [it for s, st in catch for it in self._rows(s.seq, st.start, s.seq.token_ids[st.start + 1:
                                                                                                   st.end + 1])])
        last = torch.tensor([st.end - st.start for _, st in catch]).cumsum(0) - 1
        want = [i for i, (s, _) in enumerate(catch) if s.num_draft_tokens]
        if not want:
            return {}
        seqs = [catch[i][0].seq for i in want]
        ks = [catch[i][0].num_draft_tokens for i in want]
        xs = x[to_device(last[want], r.device)]  # [B, H] the module's hidden at each sequence's last computed token
        out = {seq.request_id: _Draft([], []) for seq in seqs}
        live = list(range(len(seqs)))
        for j in range(max(ks)):
            live = [i for i in live if ks[i] > j]
            idx = to_device(torch.tensor(live), r.device)
            if j:  # chain: the module at draft j's position, on its own hidden state and draft j
                xs[idx] = self._mtp(xs[idx], [(seqs[i], seqs[i].num_computed_tokens + j - 1, 1,
                                               out[seqs[i].request_id].tokens[-1:]) for i in live])
            views = [view(seqs[i], out[seqs[i].request_id].tokens) for i in live]
            logits = torch.nan_to_num(self.mtp.head(xs[idx]))  # [B', V]
            if all(v.params.greedy for v in views):  # the argmax, and no distribution: greedy rows verify without
                q = [None] * len(live)
                tokens = r.sampler.filter_logits(logits.float(), views).argmax(dim=-1).tolist()
            else:
                q = r.sampler.target_probs(logits, views)  # [B', V]
                seeds = Seeds.of([seqs[i].sample_seed for i in live], [seqs[i].num_tokens for i in live], r.device)
                greedy = torch.tensor([v.params.greedy for v in views], device=r.device)
                tokens = draft_tokens(q, seeds, j, greedy).tolist()
            for row, i in enumerate(live):
                out[seqs[i].request_id].tokens.append(tokens[row])
                out[seqs[i].request_id].q.append(q[row])
        return out

    def _verify(self, hidden: torch.Tensor, group: list[tuple]) -> dict:
        """Sequences with the same number of drafts d, each (sequence, draft, row of its last token) -> request id
        -> `Accepted`; one whose verification raises fails alone."""
        r = self.runner
        d = len(group[0][1].tokens)
        rows = [first + j for _, _, first in group for j in range(d + 1)]
        logits = r.model.logits(hidden[to_device(torch.tensor(rows), r.device)])  # [B * (d + 1), V]
        try:
            return self._accept(logits, group)
        except Exception as e:  # noqa: BLE001 - find the rows it failed for (a lone row: that one)
            if len(group) == 1:
                rid = group[0][0].request_id
                return {rid: RequestFailed(f"request {rid!r} failed in verifying its drafts: {type(e).__name__}: {e}")}
        return {rid: res for g in group for rid, res in self._verify(hidden, [g]).items()}

    def _accept(self, logits: torch.Tensor, group: list[tuple]) -> dict:
        r = self.runner
        seqs, drafts = [g[0] for g in group], [g[1] for g in group]
        b, d = len(group), len(drafts[0].tokens)
        views = verify_views(seqs, [x.tokens for x in drafts])
        proposed = to_device(torch.tensor([x.tokens for x in drafts]), r.device)  # [B, d]
        if all(s.params.greedy for s in seqs):
            best = r.sampler.filter_logits(logits.float(), views).argmax(dim=-1).view(b, d + 1)
            tokens, n_emit = verify_greedy(best, proposed)
        else:
            p = r.sampler.target_probs(logits, views).view(b, d + 1, -1)
            v = p.shape[-1]
            q = torch.stack([torch.stack([qj if qj is not None else _one_hot(t, v, p.device)
                                          for qj, t in zip(x.q, x.tokens)]) for x in drafts])  # [B, d, V]
            seeds = Seeds.of([s.sample_seed for s in seqs], [s.num_tokens for s in seqs], r.device)
            tokens, n_emit = verify(p, q, proposed, seeds)
        tokens, n_emit = tokens.tolist(), n_emit.tolist()
        raw = torch.log_softmax(logits.float(), dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        out = {}
        for i, seq in enumerate(seqs):
            run = tokens[i][:n_emit[i]]
            lps = [None] * len(run)
            if raw is not None and seq.params.logprobs is not None:
                lps = [_logprobs(raw[i * (d + 1) + j], t, seq.params.logprobs) for j, t in enumerate(run)]
            out[seq.request_id] = Accepted(run, lps, d, n_emit[i] - 1)
        return out


def _one_hot(token: int, v: int, device) -> torch.Tensor:
    """A greedy draft's distribution, for a batch that verifies sampled rows too."""
    return torch.nn.functional.one_hot(torch.tensor(token, device=device), v).float()


def _logprobs(raw: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """The raw distribution's logprob of `token` and its top k, as `Sampler` reports them."""
    lp = {token: float(raw[token])}
    if k:
        vals, ids = raw.topk(k)
        lp.update(zip(ids.tolist(), vals.tolist()))
    return lp
