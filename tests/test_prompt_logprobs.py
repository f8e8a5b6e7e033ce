"""Prompt logprobs in the engine (no Ray): computed at every prompt position across chunked-prefill steps, never
from a prefix-cache hit, equal to a dense forward's; max_tokens 0 returns them alone; other requests unchanged."""
import pytest
import torch

from rayinfer import LLM, SamplingParams
from rayinfer.messages import EngineRequest

PROMPT = [3 + (7 * i) % 200 for i in range(150)]  # three 48-token chunks and a bit, two full cache pages


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", max_num_batched_tokens=48)


def _dense(llm, ids) -> torch.Tensor:
    """Log-probabilities [T, V] of one uncached forward over the whole prompt: row p predicts token p + 1."""
    with torch.inference_mode():
        return torch.log_softmax(llm.engine.runner.model(torch.tensor([ids]))[0].float(), dim=-1)


def test_prompt_logprobs_match_a_dense_forward_across_chunks_and_cache(llm):
    plain = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    before = llm.generate([PROMPT], plain, use_tqdm=False)[0]  # fills the prefix cache with the prompt's pages
    asked = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2)
    out, other = llm.generate([PROMPT, PROMPT[:60]], [asked, plain], use_tqdm=False)
    assert out.num_cached_tokens == 0  # a request asking for them computes every position
    assert other.prompt_logprobs is None and out.token_ids == before.token_ids
    ref = _dense(llm, PROMPT)
    lps = out.prompt_logprobs
    assert len(lps) == len(PROMPT) and lps[0] is None
    for p in range(1, len(PROMPT)):
        own = PROMPT[p]
        assert abs(lps[p][own] - ref[p - 1, own].item()) < 1e-4, p
        top = ref[p - 1].topk(2).indices.tolist()
        assert set(lps[p]) == set(top) | {own}, p


def test_max_tokens_0_returns_the_prompt_logprobs_alone(llm):
    out = llm.generate([PROMPT[:20]], SamplingParams(max_tokens=0, prompt_logprobs=0, logprobs=1),
                       use_tqdm=False)[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length" and out.logprobs == []
    ref = _dense(llm, PROMPT[:20])
    assert [None] + [{t: pytest.approx(ref[p - 1, t].item(), abs=1e-4)} for p, t in enumerate(PROMPT[1:20], 1)] \
        == out.prompt_logprobs


def test_a_continued_request_gets_none(llm):
    """A request that arrives with output (a decode rank's, a resumed one) had them sent by the rank before."""
    eng = llm.engine
    eng.add_request(EngineRequest("cont", PROMPT[:10], SamplingParams(max_tokens=3, prompt_logprobs=1),
                                  output_token_ids=[5]))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    assert deltas and all(d.prompt_logprobs is None for d in deltas)


def test_a_prompt_split_over_microbatches_fills_the_same_entries(llm):
    """A gang step may split one sequence's chunk into two microbatches (and pad decode steps with dummies): each
    piece's rows are its own, so the entries do not depend on the split."""
    from rayinfer.engine import prompt_logprobs
    from rayinfer.engine.decode_buckets import _Dummy
    from rayinfer.engine.sequence import Sequence

    model, ids = llm.engine.runner.model, PROMPT[:30]
    with torch.inference_mode():
        hidden = model.hidden_states(torch.tensor(ids), _dense_batch(len(ids)))  # [30, H]
    whole, split = (Sequence(r, ids, SamplingParams(prompt_logprobs=3)) for r in ("a", "b"))
    prompt_logprobs.record(model, [([(whole, 0, 30)], hidden)])
    prompt_logprobs.record(model, [([(split, 0, 13), (_Dummy([0]), 0, 1)], torch.cat([hidden[:13], hidden[:1]])),
                                   ([(split, 13, 17)], hidden[13:])])
    assert whole.prompt_logprobs[0] is None and split.prompt_logprobs[0] is None
    for a, b in zip(whole.prompt_logprobs[1:], split.prompt_logprobs[1:]):
        assert a == {t: pytest.approx(v, abs=1e-5) for t, v in b.items()}
    assert all(len(e) in (3, 4) for e in whole.prompt_logprobs[1:])


def _dense_batch(t: int):
    from rayinfer.model import ForwardBatch

    return ForwardBatch.dense(1, t, "cpu")
