"""Speculative verification math alone: greedy drafts accepted exactly while the target's argmax matches,
sampled output distributed as the target's (chi-square, with greedy-only acceptance as a negative control
that must fail), seeded draws independent of the batch, and rejected drafts' pages rolled back (the engine's cut of
accepted runs at stops is tests/test_spec_engine.py's)."""
import pytest
import torch
from scipy.stats import chisquare

from rayinfer.engine.sampler import Sampler
from rayinfer.engine.sequence import Sequence
from rayinfer.engine.speculative import Seeds, draft_tokens, verify, verify_greedy
from rayinfer.messages import SamplingParams

V = 6
P0 = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
P1 = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30])
Q0 = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.15, 0.05])
Q1 = torch.tensor([0.30, 0.05, 0.30, 0.05, 0.20, 0.10])


def _spec(n, greedy_accept=False, seed0=0):
    """n rows of a context-free target (P0 then P1, then P1 again for the bonus) drafted from Q0, Q1."""
    seeds = Seeds.of([seed0 + i * 7919 for i in range(n)], [5] * n)
    q = torch.stack([Q0, Q1]).expand(n, 2, V).contiguous()
    p = torch.stack([P0, P1, P1]).expand(n, 3, V).contiguous()
    no = torch.zeros(n, dtype=torch.bool)
    drafts = torch.stack([draft_tokens(q[:, j], seeds, j, no) for j in range(2)], dim=1)
    return verify(p, q, drafts, seeds, greedy_accept), drafts


def _pvalue(tokens, probs):
    counts = torch.bincount(tokens, minlength=V).double()
    expected = probs.double() / probs.double().sum() * counts.sum()
    return chisquare(counts.numpy(), expected.numpy()).pvalue


def test_sampled_tokens_follow_the_target_distribution():
    (tokens, n_emit), _ = _spec(24000)
    assert _pvalue(tokens[:, 0], P0) > 0.01
    second = tokens[n_emit >= 2, 1]
    assert len(second) > 5000
    assert _pvalue(second, P1) > 0.01
    assert 0 < (n_emit == 1).sum() < len(n_emit)  # both rejections and acceptances happened


def test_greedy_only_acceptance_is_detected():
    (tokens, _), _ = _spec(24000, greedy_accept=True)
    assert _pvalue(tokens[:, 0], P0) < 0.01


def test_greedy_rows_accept_while_the_argmax_matches():
    torch.manual_seed(0)
    b, k = 64, 3
    target = torch.randn(b, k + 1, V)
    p = torch.nn.functional.one_hot(target.argmax(-1), V).float()
    q = torch.randn(b, k, V).softmax(-1)
    drafts = torch.where(torch.rand(b, k) < 0.6, target[:, :k].argmax(-1), torch.randint(0, V, (b, k)))
    tokens, n_emit = verify(p, q, drafts, Seeds.of(list(range(b)), [0] * b))
    best = target.argmax(-1)
    fast, n_fast = verify_greedy(best, drafts)  # the engine's shortcut for all-greedy batches
    assert torch.equal(n_fast, n_emit) and all(fast[r, :n].tolist() == tokens[r, :n].tolist()
                                               for r, n in enumerate(n_emit.tolist()))
    for r in range(b):
        match = (drafts[r] == best[r, :k]).long().tolist() + [0]
        n = match.index(0) + 1
        assert n_emit[r] == n
        assert tokens[r, :n].tolist() == best[r, :n].tolist()


def test_draws_are_a_function_of_seed_and_position_only():
    (full, n_full), d_full = _spec(40, seed0=3)
    seeds = Seeds.of([3 + i * 7919 for i in range(40)][10:20], [5] * 10)
    q = torch.stack([Q0, Q1]).expand(10, 2, V).contiguous()
    p = torch.stack([P0, P1, P1]).expand(10, 3, V).contiguous()
    no = torch.zeros(10, dtype=torch.bool)
    drafts = torch.stack([draft_tokens(q[:, j], seeds, j, no) for j in range(2)], dim=1)
    part, n_part = verify(p, q, drafts, seeds)
    assert torch.equal(drafts, d_full[10:20])
    assert torch.equal(n_part, n_full[10:20])
    for r in range(10):
        assert part[r, :n_part[r]].tolist() == full[10 + r, :n_full[10 + r]].tolist()


def test_target_probs_is_the_samplers_filtered_distribution():
    logits = torch.randn(3, V) * 2
    seqs = [Sequence(str(i), [1, 2], p) for i, p in enumerate([
        SamplingParams(temperature=0), SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3)])]
    probs = Sampler(0).target_probs(logits, seqs)
    assert torch.equal(probs[0], torch.nn.functional.one_hot(logits[0].argmax(), V).float())
    assert torch.allclose(probs[1], logits[1].softmax(-1))
    assert (probs[2] > 0).sum() == 3
    assert torch.allclose(probs[2].sum(), torch.tensor(1.0))
    top = logits[2].topk(3).indices
    assert torch.allclose(probs[2][top], (logits[2][top] / 0.7).softmax(-1))


def test_rejected_drafts_pages_roll_back_and_only_verified_tokens_are_hashed():
    from rayinfer.engine.block_manager import BlockManager, prefix_hashes
    bm = BlockManager(6, 4)
    seq = Sequence("r", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=16))
    bm.append(seq, 6)
    seq.num_computed_tokens = 6
    bm.commit(seq)
    seq.token_ids.append(7)  # the prefill's sampled token
    bm.append(seq, 1 + 3)  # it plus three drafts: slots up to position 9, three pages
    assert len(seq.block_ids) == 3 and bm.num_free_blocks == 3
    seq.num_computed_tokens = 7  # every draft rejected: only token 7 was verified
    seq.token_ids.append(70)  # the corrected token, not yet computed
    bm.trim(seq, seq.num_tokens)
    bm.commit(seq)
    assert len(seq.block_ids) == 2 and bm.num_free_blocks == 4
    assert len(bm.cached) == 1
    bm.append(seq, 1 + 3)
    seq.num_computed_tokens = 11  # all three drafts 8, 9, 10 accepted, plus the bonus 11 pending
    seq.token_ids.extend([8, 9, 10, 11])
    bm.trim(seq, seq.num_tokens)
    bm.commit(seq)
    assert seq.block_hashes == prefix_hashes(seq.token_ids, 4, 2)
    assert set(bm.cached) == set(seq.block_hashes)
    bm.release(seq)
    assert bm.num_free_blocks == 6


def _ctx_logits(seq, v=97):
    g = torch.Generator().manual_seed(hash(tuple(seq.token_ids[-3:])) % 2 ** 31)
    return 3 * torch.randn(v, generator=g)


@pytest.mark.parametrize("wrong_at", [None, 0, 2])
def test_penalised_greedy_verification_matches_plain_decoding(wrong_at):
    """Penalties see each draft position's own history: a perfect drafter's run is plain decoding's."""
    from rayinfer.engine.speculative import verify_views
    params = SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.6, frequency_penalty=0.7)
    sampler, plain = Sampler(0), Sequence("a", [3, 1, 4, 1, 5], params)
    for _ in range(4):
        (t,), _ = sampler(_ctx_logits(plain)[None], [plain])
        plain.token_ids.append(t)
    want = plain.output_token_ids
    drafts = want[:3]
    if wrong_at is not None:
        drafts[wrong_at] = (drafts[wrong_at] + 1) % 97
    seq = Sequence("a", [3, 1, 4, 1, 5], params)
    views = verify_views([seq], [drafts])
    p = sampler.target_probs(torch.stack([_ctx_logits(v) for v in views]), views)[None]  # [1, 4, V]
    q = torch.nn.functional.one_hot(torch.tensor([drafts]), 97).float()
    tokens, n = verify(p, q, torch.tensor([drafts]), Seeds.of([seq.sample_seed or 0], [seq.num_tokens]))
    keep = 4 if wrong_at is None else wrong_at + 1
    assert tokens[0, :n[0]].tolist() == want[:keep]
