"""The sampler alone: batch independence, exact resume, penalties and min_tokens against a per-row
reference, noise statistics, op count independent of batch size, and no CPU tensor meeting a device one."""
import math

import pytest
import torch
from device_guard import DeviceGuard

from rayinfer.engine.sampler import Sampler, uniform_noise
from rayinfer.engine.sequence import Sequence
from rayinfer.messages import SamplingParams

V = 97


def _seq(rid, prompt, params, outputs=()):
    s = Sequence(rid, prompt, params)
    s.token_ids.extend(outputs)
    return s


def _logits(seqs, salt=0):
    """Logits that depend only on each row's own tokens (what a batch-invariant model gives)."""
    rows = []
    for s in seqs:
        g = torch.Generator().manual_seed(hash((tuple(s.token_ids[-3:]), salt)) % 2 ** 31)
        rows.append(3 * torch.randn(V, generator=g))
    return torch.stack(rows)


def _run(sampler, seqs, steps):
    for _ in range(steps):
        tokens, _ = sampler(_logits(seqs), seqs)
        for s, t in zip(seqs, tokens):
            s.token_ids.append(t)
    return [s.output_token_ids for s in seqs]


SEEDED = SamplingParams(max_tokens=64, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, seed=7,
                        repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1)


def test_seeded_row_ignores_the_rest_of_the_batch():
    alone = _run(Sampler(0), [_seq("a", [1, 2, 3], SEEDED)], 24)[0]
    others = [_seq(f"o{i}", [i + 4] * (i + 1), SamplingParams(temperature=1.0, top_k=i % 3 * 5, min_tokens=i % 2))
              for i in range(9)]
    for at in (0, 4, 9):
        batch = others[:at] + [_seq("a", [1, 2, 3], SEEDED)] + others[at:]
        assert _run(Sampler(at + 100), batch, 24)[at] == alone
    other_seed = _run(Sampler(0), [_seq("a", [1, 2, 3], SamplingParams(**{**SEEDED.__dict__, "seed": 8}))], 24)[0]
    assert other_seed != alone


@pytest.mark.parametrize("k", [1, 5, 13])
def test_resume_from_emitted_tokens_samples_the_same_continuation(k):
    full = _run(Sampler(0), [_seq("a", [5, 6], SEEDED)], 20)[0]
    resumed = _seq("a", [5, 6], SEEDED, full[:k])
    assert full[:k] + _run(Sampler(123), [resumed], 20 - k)[0][k:] == full


def test_unseeded_request_resumes_exactly_with_its_drawn_seed():
    unseeded = SamplingParams(temperature=1.0)
    first = _seq("u", [9, 9], unseeded)
    full = _run(Sampler(0), [first], 12)[0]
    carried = int.from_bytes(first.sample_seed.to_bytes(8, "little"), "little")  # what a handoff carries
    resumed = _seq("u", [9, 9], unseeded, full[:4])
    resumed.sample_seed = carried
    assert _run(Sampler(55), [resumed], 8)[0] == full
    assert _run(Sampler(1), [_seq("u", [9, 9], unseeded)], 12)[0] != full  # a fresh draw per request


def _reference_penalties(logits, seq):
    p, out = seq.params, seq.output_token_ids
    x = logits.clone()
    for t in set(out) | set(seq.token_ids[:seq.num_prompt_tokens]):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return x


def test_penalties_match_a_per_row_reference():
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
              SamplingParams(), SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.0, presence_penalty=2.0)]
    seqs = [_seq(str(i), [3, 4, 4, 50 + i], p, [4, 7, 7, 7, 60, i]) for i, p in enumerate(params)]
    logits = _logits(seqs)
    f = torch.tensor([[getattr(p, n) for n in ("temperature", "top_p", "min_p", "presence_penalty",
                                               "frequency_penalty", "repetition_penalty")] for p in params])
    got = Sampler(0)._penalise(logits, seqs, f)
    want = torch.stack([_reference_penalties(row, s) for row, s in zip(logits, seqs)])
    torch.testing.assert_close(got, want)
    assert torch.equal(got[2], logits[2])


def test_greedy_with_repetition_penalty_avoids_the_repeated_argmax():
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11] = 4.0, 3.0
    seq = _seq("r", [10], SamplingParams(temperature=0, repetition_penalty=2.0))
    assert Sampler(0)(logits, [seq])[0] == [11]  # 4 / 2 < 3
    assert Sampler(0)(logits, [_seq("r", [10], SamplingParams(temperature=0))])[0] == [10]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, V)
    logits[:, 2], logits[:, 30] = 50.0, 40.0  # EOS 2 then stop id 30 dominate
    for n_out, want in [(0, 31), (2, 31), (3, 2)]:
        seqs = [_seq(str(i), [1], SamplingParams(temperature=t, min_tokens=3, stop_token_ids=[30], seed=i),
                     [5] * n_out) for i, t in enumerate((0.0, 0.7))]
        logits[:, 31] = 30.0
        tokens, _ = Sampler(0, eos_token_ids={2})(logits, seqs)
        assert tokens == [want, want], (n_out, tokens)
    ignore = _seq("x", [1], SamplingParams(temperature=0, min_tokens=3, ignore_eos=True))
    assert Sampler(0, eos_token_ids={2})(logits[:1], [ignore])[0] == [2]  # ignore_eos: EOS is an ordinary token


def test_noise_is_uniform_and_sampling_follows_the_distribution():
    b = 4000
    u = uniform_noise(torch.full((b,), 11), torch.zeros(b, dtype=torch.long), torch.arange(b))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert torch.histc(u, bins=10, min=0, max=1).min() > b / 10 * 0.8
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    for top_k in (0, 3):  # vocab order, and the sorted (top-k) path
        seqs = [_seq(str(i), [1], SamplingParams(temperature=1.0, seed=11, top_k=top_k)) for i in range(b)]
        for i, s in enumerate(seqs):
            s.token_ids += [0] * i  # every row at another position
        tokens, _ = Sampler(0)(probs.log().expand(b, -1).contiguous(), seqs)
        hits = torch.bincount(torch.tensor(tokens), minlength=4).float() / b
        want = probs if top_k == 0 else torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95
        assert (hits - want).abs().max() < 4 * math.sqrt(0.25 / b), (top_k, hits)
    assert uniform_noise(torch.tensor([11]), torch.tensor([0]), torch.tensor([5])) != \
        uniform_noise(torch.tensor([11]), torch.tensor([1]), torch.tensor([5]))


def test_logprobs_are_the_raw_distribution():
    logits = _logits([_seq("l", [1, 2], SamplingParams())])
    seq = _seq("l", [1, 2], SamplingParams(temperature=0.5, logprobs=3, seed=1, repetition_penalty=2.0))
    other = _seq("m", [3], SamplingParams(temperature=0))
    (tok, _), (lp, none) = Sampler(0)(torch.cat([logits, logits]), [seq, other])
    raw = torch.log_softmax(logits[0], -1)
    assert none is None and len(lp) in (3, 4) and lp[tok] == pytest.approx(raw[tok].item())
    top = raw.topk(3)
    assert all(lp[i] == pytest.approx(v) for i, v in zip(top.indices.tolist(), top.values.tolist()))


def _mixed_batch(n):
    kinds = [SEEDED, SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=1.0, min_tokens=5,
                                                                                 stop_token_ids=[3])]
    return [_seq(str(i), [1 + i % 7] * (2 + i % 5), kinds[i % 3], [i % V] * (i % 4)) for i in range(n)]


def test_op_count_does_not_grow_with_batch_size_and_nothing_syncs():
    counts = []
    for n in (3, 48):
        seqs = _mixed_batch(n)
        logits = _logits(seqs)
        with DeviceGuard() as mode:
            Sampler(0, eos_token_ids={2}).sample(logits, seqs)
        assert not mode.syncs()
        counts.append(len(mode.ops))
    assert counts[0] == counts[1], counts


def test_sampler_keeps_everything_on_the_logits_device():
    seqs = _mixed_batch(6)
    with DeviceGuard():
        out = Sampler(0, "meta", eos_token_ids={2}).sample(torch.empty(6, V, device="meta"), seqs)
    assert out.device.type == "meta" and out.shape == (6, 2 + 2 * 2)


def test_seeds_are_taken_modulo_2_64_as_a_handoff_carries_them():
    def run(seed):
        return _run(Sampler(0), [_seq("n", [4], SamplingParams(temperature=1.0, seed=seed))], 8)[0]

    assert run(-3) == run(2 ** 64 - 3) != run(3)


def test_logit_bias_forces_and_bans_tokens_and_leaves_logprobs_raw():
    """+100 on one token makes every sampled token that token (at any temperature); -100 bans one; the reported
    logprobs stay the model's own (OpenAI reports them before the bias)."""
    forced = SamplingParams(max_tokens=8, temperature=1.5, seed=3, logit_bias={11: 100}, logprobs=1)
    banned_id = None
    plain = [_seq("p", [1, 2], SamplingParams(max_tokens=8, temperature=0.0))]
    _run(Sampler(0), plain, 1)
    banned_id = plain[0].output_token_ids[0]
    seqs = [_seq("f", [1, 2], forced), _seq("b", [1, 2], SamplingParams(max_tokens=8, temperature=0.0,
                                                                          logit_bias={banned_id: -100}))]
    sampler = Sampler(0)
    first_logits = _logits(seqs)
    _, lps = sampler(first_logits, seqs)
    assert lps[0][11] == pytest.approx(torch.log_softmax(first_logits[0], -1)[11].item(), abs=1e-6)
    outs = _run(sampler, seqs, 6)
    assert outs[0] == [11] * 6
    assert outs[1][0] != banned_id
    filtered = sampler.filter_logits(first_logits.clone(), seqs)
    assert filtered[0, 11] == pytest.approx(first_logits[0, 11].item() + 100)


def test_logit_bias_bounds_and_round_trip():
    from rayinfer.messages import pack, unpack
    p = SamplingParams(logit_bias={9: 1.5, 2: -3})
    assert p.logit_bias == ((2, -3.0), (9, 1.5))
    assert unpack(pack(p), SamplingParams) == p
    for bad in ({-1: 1}, {2: 101}, {"x": 1}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
