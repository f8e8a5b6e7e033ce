"""The bounds a request meets at the ingress before any rank sees it (rayinfer.openai.limits): every token id it
sends inside the vocabulary, its lists (prompts, choices, stop strings and ids, prompt tokens returned with logprobs) within `RequestLimits`, counted
before any prompt is tokenized; and admission by choices and tokens, not by HTTP requests."""
import time

import pytest

from rayinfer.model import resolve_model_path
from rayinfer.openai.limits import Admission, RequestLimits
from rayinfer.openai.protocol import APIError, ModelInfo, parse_chat_request, parse_completion_request
from rayinfer.tokenizer import load_tokenizer

VOCAB = 320


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo("tiny", 4096, VOCAB, load_tokenizer(resolve_model_path("tiny")),
                     limits=RequestLimits(max_prompts_per_request=8, max_choices_per_request=12,
                                          max_stop_strings=3, max_stop_token_ids=5, max_prompt_logprob_tokens=20))


def _refused(parse, body, info, param: str, *words: str) -> APIError:
    with pytest.raises(APIError) as e:
        parse(body, info)
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)
    for w in words:
        assert w in e.value.message, e.value.message
    return e.value


@pytest.mark.parametrize("ids", [[99999], [VOCAB], [-1], [5, 2**64], [True], [1.0], ["3"]])
def test_stop_token_ids_outside_the_vocabulary_are_refused(info, ids):
    for parse, body in ((parse_completion_request, {"model": "tiny", "prompt": "hi"}),
                        (parse_chat_request, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})):
        _refused(parse, dict(body, stop_token_ids=ids, min_tokens=1, max_tokens=4), info, "stop_token_ids",
                 f"[0, {VOCAB})")


def test_list_sizes_are_bounded_by_the_limits(info):
    base = {"model": "tiny", "prompt": "hi"}
    _refused(parse_completion_request, dict(base, stop_token_ids=[1] * 6), info, "stop_token_ids",
             "6 stop token ids", "at most 5", "max_stop_token_ids")
    _refused(parse_completion_request, dict(base, stop=["a", "b", "c", "d"]), info, "stop", "at most 3")
    _refused(parse_completion_request, dict(base, prompt=["hi"] * 9), info, "prompt", "9 prompts", "at most 8")
    _refused(parse_completion_request, dict(base, prompt=[[5, 6]] * 4, n=4), info, "n", "16 choices", "at most 12")
    _refused(parse_chat_request, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 13},
             info, "n", "at most 12")
    # prompt logprobs: returned per prompt token and choice (echo with logprobs, or prompt_logprobs)
    _refused(parse_completion_request, dict(base, prompt=[[5] * 6] * 2, n=2, echo=True, logprobs=0), info, "echo",
             "24 prompt tokens", "at most 20", "max_prompt_logprob_tokens")
    _refused(parse_completion_request, dict(base, prompt=[5] * 21, prompt_logprobs=1), info, "prompt_logprobs",
             "at most 20")
    assert parse_completion_request(dict(base, prompt=[5] * 21, echo=True), info).params.prompt_logprobs is None
    spec = parse_completion_request(dict(base, prompt=[[5, 6]] * 4, n=3, stop=["a", "b", "c"],
                                         stop_token_ids=[0, 319, 1, 2, 3]), info)
    assert len(spec.prompts) * spec.n == 12 and spec.params.stop_token_ids == (0, 319, 1, 2, 3)


def test_the_fan_out_body_is_refused_before_any_prompt_is_tokenized():
    class Untouchable:  # a tokenizer that must not be called
        def encode(self, *_a, **_k):
            raise AssertionError("tokenized a prompt of a request that is refused anyway")

    info = ModelInfo("tiny", 4096, VOCAB, Untouchable())
    t0 = time.perf_counter()
    e = _refused(parse_completion_request, {"model": "tiny", "prompt": ["hi"] * 4000, "n": 16, "max_tokens": 1},
                 info, "prompt", "4000 prompts", "max_prompts_per_request")
    assert time.perf_counter() - t0 < 1.0, e  # work in proportion to the body's bytes only


def test_admission_counts_choices_and_tokens():
    a = Admission(max_choices=10, max_tokens=100)
    first = a.admit(6, 60)
    assert a.snapshot() == {"inflight": 1, "queued_choices": 6, "queued_tokens": 60, "parsing": 0}
    with pytest.raises(APIError) as e:
        a.admit(5, 10)  # choices would pass the bound: one HTTP request, but 5 choices
    assert e.value.status == 429 and "choices" in e.value.message
    with pytest.raises(APIError) as e:
        a.admit(1, 41)
    assert e.value.status == 429 and "tokens" in e.value.message
    for want in ((11, 1), (1, 101)):  # larger than the whole queue: never admitted, so not "retry shortly"
        with pytest.raises(APIError) as e:
            a.admit(*want)
        assert e.value.status == 400 and ("max_queue" in e.value.message), e.value.message
    second = a.admit(4, 40)
    a.release(first)
    a.release(second)
    assert a.snapshot() == {"inflight": 0, "queued_choices": 0, "queued_tokens": 0, "parsing": 0}
