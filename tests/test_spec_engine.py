"""MTP speculative decoding in the engine, on the tiny preset: greedy output token-identical to plain decoding for
k = 1..3 (with drafts accepted, through an oracle that overrides the MTP module's proposals after they ran, and with
the module's own), stops and max_tokens cut inside accepted runs, drafts equal to a cache-free recomputation of the
MTP module, seeded sampling reproducible, acceptance counted per position, and a checkpoint without MTP refused."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayinfer import LLM, SamplingParams
from rayinfer.config import ConfigError
from rayinfer.model import ForwardBatch
from rayinfer.model.presets import resolve_model_path

from helpers import hand_off

GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
PROMPTS = [[0, 5, 6, 7], list(range(5, 70)), [0] + list(range(100, 190)), [9, 9, 9, 9, 9]]


@pytest.fixture(scope="module")
def plain():
    return LLM("tiny")


@pytest.fixture(scope="module")
def reference(plain):
    return [o.token_ids for o in plain.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0.0,
                                                                         ignore_eos=True), use_tqdm=False)]


def with_oracle(llm, reference, miss_every=4, seen=None, prompts=PROMPTS):
    """Drafts replaced by the plain run's continuation (wrong at every `miss_every`-th output position), after
    the MTP module proposed its own (recorded in `seen`: (verified tokens, drafts) per drafting sequence)."""
    drafter = getattr(llm, "engine", llm).runner.drafter  # an LLM or an Engine
    real, cont = drafter._propose, {tuple(p): r for p, r in zip(prompts, reference)}
    vocab = drafter.runner.vocab_size

    def propose(sched):
        out = real(sched)
        for s in sched.scheduled:
            d, seq = out.get(s.seq.request_id), s.seq
            if d is None:
                continue
            if seen is not None:
                seen.append((list(seq.token_ids), list(d.tokens)))
            ref = cont[tuple(seq.token_ids[:seq.num_prompt_tokens])]
            for j in range(len(d.tokens)):
                n = seq.num_output_tokens + j
                t = ref[n] if (n + 1) % miss_every else (ref[n] + 1) % vocab
                d.tokens[j], d.q[j] = t, torch.nn.functional.one_hot(torch.tensor(t), vocab).float()
        return out

    drafter._propose = propose
    return llm


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculation_is_token_identical_to_plain_decoding(plain, reference, k):
    llm = with_oracle(LLM("tiny", num_speculative_tokens=k), reference)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (14, 9, 23, 1)]
    want = [r[:p.max_tokens] for r, p in zip(reference, params)]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == want  # max_tokens 9 and 23 land inside runs of k + 1
    assert all(o.finish_reason == "length" for o in outs)
    drafted, accepted = llm.stats()[0]["spec_draft_tokens"], llm.stats()[0]["spec_accepted_tokens"]
    assert len(drafted) == k and accepted[0] > 0 and sum(accepted) < sum(drafted)  # accepted and rejected ones
    assert all(a <= d for a, d in zip(accepted, drafted)) and accepted == sorted(accepted, reverse=True)
    per_request = [sum(col) for col in zip(*[o.spec_accepted_tokens for o in outs if o.spec_accepted_tokens])]
    assert per_request == accepted  # each request's counts add up to the engine's
    assert outs[3].spec_draft_tokens is None  # one token: nothing to draft
    assert llm.stats()[0]["generation_tokens"] == sum(p.max_tokens for p in params)  # usage: emitted tokens only
    assert llm.engine.block_manager.num_allocated_blocks() == 0
    # The MTP module's own drafts (random weights: almost none accepted) give the same tokens too.
    own = LLM("tiny", num_speculative_tokens=k).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in own] == [r[:GREEDY.max_tokens] for r in reference]


def test_greedy_speculation_under_preemption_and_prefix_hits(plain):
    prompts = [PROMPTS[1] + [8], PROMPTS[2][:40], PROMPTS[1] + [7]]  # a shared first page; each grows a page
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = with_oracle(LLM("tiny", num_speculative_tokens=2, kv_cache_tokens=256), reference, prompts=prompts)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.block_manager.hits > 0
    assert llm.stats()[0]["spec_accepted_tokens"][0] > 0
    assert llm.engine.block_manager.num_allocated_blocks() == 0


def test_stops_cut_an_accepted_run_where_plain_decoding_stops(plain, reference):
    base = plain.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                          use_tqdm=False)[0]
    stop = next(base.text[i:i + 2] for i in range(5, 20) if "\ufffd" not in base.text[i:i + 2])
    llm = with_oracle(LLM("tiny", num_speculative_tokens=3), reference, miss_every=1000)
    for p in (SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]),
              SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[base.token_ids[6]]),
              SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[base.token_ids[6]], min_tokens=8)):
        want, got = (x.generate([PROMPTS[0]], p, use_tqdm=False)[0] for x in (plain, llm))
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert (want.finish_reason == "stop" and len(want.token_ids) < 40) if not p.min_tokens \
            else len(want.token_ids) > 7  # min_tokens holds the stop token back
        assert got.spec_accepted_tokens[0] > 0


def test_drafts_equal_a_cache_free_recomputation_of_the_mtp_module(reference):
    seen = []
    llm = with_oracle(LLM("tiny", num_speculative_tokens=2), reference, seen=seen)
    llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    model = llm.engine.runner.model
    mtp = model.mtp[0]
    assert len(seen) > 8
    with torch.inference_mode():
        for tokens, drafts in seen:
            ids = torch.tensor(tokens)
            t = len(tokens)
            hid = model.norm(model.hidden_states(ids, ForwardBatch.dense(1, t)))[:t - 1]
            nxt, want = ids[1:], []
            for _ in drafts:  # position p: the target's hidden at p (the module's own past the last) and token p + 1
                x = mtp.propose(hid, model.embed_tokens(nxt), ForwardBatch.dense(1, len(nxt)))
                want.append(int(mtp.head(x[-1:]).argmax()))
                hid, nxt = torch.cat([hid, x[-1:]]), torch.cat([nxt, torch.tensor(want[-1:])])
            assert drafts == want, (len(tokens), drafts, want)


def test_seeded_sampling_with_speculation_is_reproducible(reference):
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=s) for s in (1, 2)]
    params.append(SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))  # greedy in a sampled batch
    runs = [[o.token_ids for o in LLM("tiny", num_speculative_tokens=2).generate(PROMPTS[:3], params,
                                                                                  use_tqdm=False)]
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]
    assert runs[0][2] == reference[2][:12]


def test_a_checkpoint_without_mtp_is_refused(tmp_path):
    src = resolve_model_path("tiny")
    n = json.load(open(os.path.join(src, "config.json")))["num_hidden_layers"]
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), tmp_path / name)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{n}.")},
              tmp_path / "model.safetensors")
    LLM(str(tmp_path))  # fine without speculation
    with pytest.raises(ConfigError, match="no MTP module"):
        LLM(str(tmp_path), num_speculative_tokens=1)


def test_logprobs_under_speculation_are_plain_decodings(plain, reference):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    want = plain.generate(PROMPTS[:2], params, use_tqdm=False)
    got = with_oracle(LLM("tiny", num_speculative_tokens=2), reference).generate(PROMPTS[:2], params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and len(g.logprobs) == 10 and sum(g.spec_accepted_tokens) > 0
        for lw, lg in zip(w.logprobs, g.logprobs):
            assert lw.keys() == lg.keys() and all(abs(lw[t] - lg[t]) < 1e-4 for t in lw)


def test_structured_output_under_speculation_is_plain_decodings(plain):
    pytest.importorskip("xgrammar")
    params = SamplingParams(max_tokens=16, temperature=0.0, structured=("regex", "[a-z]{4,10}, [0-9]+"))
    want = plain.generate(["pick: "], params, use_tqdm=False)[0]
    got = LLM("tiny", num_speculative_tokens=2).generate(["pick: "], params, use_tqdm=False)[0]
    assert (got.text, got.finish_reason) == (want.text, want.finish_reason) and got.spec_draft_tokens[0] > 0


def test_a_speculating_decode_engine_takes_handed_off_kv(reference):
    """A prefill engine (no drafting there) hands off; the decode engine's first step is plain (the MTP module has
    seen none of the prompt), then it drafts, and the tokens are those of one plain engine."""
    from rayinfer.config import EngineConfig
    from rayinfer.engine.engine import Engine

    prefill = Engine(EngineConfig.from_options("tiny", scheduler_mode="prefill", num_speculative_tokens=2))
    decode = Engine(EngineConfig.from_options("tiny", scheduler_mode="decode", num_speculative_tokens=2))
    assert prefill.runner.drafter is None and len(prefill.runner.model.mtp) == 0
    with_oracle(decode, reference)
    got = hand_off(prefill, decode, PROMPTS, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    while decode.has_unfinished():
        for d in decode.step():
            got[d.request_id] += d.token_ids
    assert [got[str(i)] for i in range(len(PROMPTS))] == [r[:20] for r in reference]
    assert decode.counters["kv_imported_tokens"] > 0 and decode.stats()["spec_accepted_tokens"][0] > 0


def test_a_request_failing_in_a_speculative_step_fails_alone(reference):
    llm = with_oracle(LLM("tiny", num_speculative_tokens=2), reference)
    sampler = llm.engine.runner.sampler
    inner = sampler.filter_logits

    def faulty(logits, seqs, f=None):  # this request's rows break wherever they are filtered (drafting, verifying)
        if any(s.params.max_tokens == 13 and s.num_output_tokens >= 3 for s in seqs):
            raise IndexError("injected")
        return inner(logits, seqs, f)

    sampler.filter_logits = faulty
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (14, 13, 14)]
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert outs[1].finish_reason == "error" and "injected" in outs[1].error
    assert [outs[0].token_ids, outs[2].token_ids] == [reference[0][:14], reference[2][:14]]
    assert llm.engine.block_manager.num_allocated_blocks() == 0
