"""Logprobs of a prompt's own tokens: vLLM's `prompt_logprobs`, and what OpenAI's `echo` with `logprobs` reports.

Owns their computation from a step's hidden states. Only sequences that ask (`SamplingParams.prompt_logprobs`)
and have no output yet (`Sequence.needs_prompt_logprobs`) get logits beyond their last row; every other row of
the step stays last-token-only. A chunked prefill fills them chunk by chunk, by position, so a preempted prompt
recomputed later writes the same entries again. Such a sequence is never given a prefix-cache or disk-tier hit:
cached positions are not computed, so they would have no logits (block_manager / disk_tier skip it).

Entry p of `Sequence.prompt_logprobs` is `{token id: logprob}` of prompt token p given the tokens before it: the
prompt's own token plus the top k, as the model's raw distribution has them (no penalty, bias or temperature).
Entry 0 stays None: nothing predicts the first token (OpenAI and vLLM return null there). Crossing it: the whole
list leaves the rank in the request's first `Delta` (on a disaggregated server, the prefill rank's).
"""
from __future__ import annotations

import torch

ROWS_PER_SLICE = 512  # logits rows [rows, vocab] in fp32 at once: bounds the memory of a long prompt's logits


def record(model, pieces) -> None:
    """pieces: (items, hidden [rows, H]) pairs, item i's chunk (sequence, first position, tokens) taking the next
    `tokens` rows of `hidden` in order. Fills the prompt logprobs of every asking sequence's positions computed."""
    picked, targets, slots = [], [], []  # hidden rows, the token each predicts, (sequence, prompt index)
    for items, hidden in pieces:
        rows, offset = [], 0
        for seq, start, n in items:
            if getattr(seq, "needs_prompt_logprobs", False):  # decode-bucket dummies have no such flag
                for p in range(start, min(start + n, seq.num_prompt_tokens - 1)):
                    rows.append(offset + p - start)
                    targets.append(seq.token_ids[p + 1])
                    slots.append((seq, p + 1))
            offset += n
        if rows:
            picked.append(hidden[torch.tensor(rows, device=hidden.device)])
    if not slots:
        return
    h = torch.cat(picked)  # [R, H]
    tgt = torch.tensor(targets, device=h.device)[:, None]  # [R, 1]
    k = max(seq.params.prompt_logprobs for seq, _ in slots)
    out = []
    for i in range(0, h.shape[0], ROWS_PER_SLICE):
        lp = torch.log_softmax(model.logits(h[i:i + ROWS_PER_SLICE]).float(), dim=-1)  # [r, V]
        parts = [lp.gather(1, tgt[i:i + ROWS_PER_SLICE]).double()]
        if k:
            vals, ids = lp.topk(k, dim=-1)
            parts += [ids.double(), vals.double()]
        out.append(torch.cat(parts, dim=1))  # [r, 1 + 2k]: own logprob, top ids, top logprobs
    for (seq, p), t, row in zip(slots, targets, torch.cat(out).cpu().tolist()):  # one host transfer
        kk = seq.params.prompt_logprobs
        entry = dict(zip(map(int, row[1:1 + kk]), row[1 + k:1 + k + kk]))
        entry[t] = row[0]
        seq.prompt_logprobs[p] = entry
