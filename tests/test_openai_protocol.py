"""The OpenAI protocol layer without Ray: request validation, chat template, response shapes, SSE.

Responses are checked with the official `openai` client's own types, and once end to end through
the client itself (its request bodies parsed by us, our SSE parsed by it) over a mock transport.
"""
import json
import os
import shutil

import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from rayinfer.openai import protocol as proto
from rayinfer.model import resolve_model_path
from rayinfer.openai.protocol import (SSE_DONE, APIError, ChoiceResult, ModelInfo, chat_chunk, chat_logprobs,
                                      chat_response, completion_chunk, completion_logprobs, completion_response,
                                      models_response, parse_chat_request, parse_completion_request, sse,
                                      usage_chunk, usage_dict, usage_for)
from rayinfer.tokenizer import Tokenizer, load_tokenizer

try:  # the transport library the installed openai client is built on (3.x: httpx2, 1.x: httpx)
    import httpx2
except ImportError:
    import httpx as httpx2

MAX_LEN, VOCAB = 64, 320
TINY = resolve_model_path("tiny")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def info(tok) -> ModelInfo:
    return ModelInfo("tiny", MAX_LEN, VOCAB, tok, created=1700000000)


_F = {"type": "function", "function": {"name": "f"}}


def _chat(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}


def _cmpl(**kw):
    return {"model": "tiny", "prompt": "hello", **kw}


# (kind, body, status, error type, param, fragments the message must contain)
BAD = {
    "body-null": ("completion", None, 400, "invalid_request_error", None, ["JSON object", "NoneType"]),
    "body-list": ("chat", [1, 2], 400, "invalid_request_error", None, ["JSON object", "list"]),
    "body-string": ("completion", "prompt", 400, "invalid_request_error", None, ["JSON object", "str"]),
    "model-missing": ("chat", {"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error",
                      "model", ["'model'"]),
    "model-not-str": ("completion", _cmpl(model=7), 400, "invalid_request_error", "model", ["'model'", "7"]),
    "model-unknown": ("chat", _chat(model="gpt-4o"), 404, "not_found_error", "model", ["gpt-4o", "does not exist"]),
    "prompt-missing": ("completion", {"model": "tiny"}, 400, "invalid_request_error", "prompt", ["'prompt'"]),
    "prompt-empty-str": ("completion", _cmpl(prompt=""), 400, "invalid_request_error", "prompt", ["empty"]),
    "prompt-empty-list": ("completion", _cmpl(prompt=[]), 400, "invalid_request_error", "prompt", ["empty"]),
    "prompt-empty-ids": ("completion", _cmpl(prompt=[[5, 6], []]), 400, "invalid_request_error", "prompt[1]",
                         ["empty"]),
    "prompt-id-too-big": ("completion", _cmpl(prompt=[5, 320]), 400, "invalid_request_error", "prompt",
                          ["320", "[0, 320)"]),
    "prompt-id-negative": ("completion", _cmpl(prompt=[[5], [-1]]), 400, "invalid_request_error", "prompt[1]",
                           ["-1", "[0, 320)"]),
    "prompt-bool-ids": ("completion", _cmpl(prompt=[True, 5]), 400, "invalid_request_error", "prompt[0]",
                        ["true", "token ids"]),
    "prompt-float-ids": ("completion", _cmpl(prompt=[[1.5]]), 400, "invalid_request_error", "prompt", ["1.5"]),
    "prompt-number": ("completion", _cmpl(prompt=42), 400, "invalid_request_error", "prompt", ["42", "string"]),
    "max-tokens-zero": ("completion", _cmpl(max_tokens=0), 400, "invalid_request_error", "max_tokens", ["0", ">= 1"]),
    "max-tokens-str": ("chat", _chat(max_tokens="10"), 400, "invalid_request_error", "max_tokens", ['"10"']),
    "max-tokens-bool": ("completion", _cmpl(max_tokens=True), 400, "invalid_request_error", "max_tokens", ["true"]),
    "max-tokens-float": ("completion", _cmpl(max_tokens=8.0), 400, "invalid_request_error", "max_tokens", ["8.0"]),
    "max-completion-tokens": ("chat", _chat(max_completion_tokens=-3), 400, "invalid_request_error",
                              "max_completion_tokens", ["-3"]),
    "temperature-high": ("chat", _chat(temperature=2.5), 400, "invalid_request_error", "temperature",
                         ["2.5", "[0, 2]"]),
    "temperature-negative": ("completion", _cmpl(temperature=-0.1), 400, "invalid_request_error", "temperature",
                             ["-0.1"]),
    "temperature-bool": ("chat", _chat(temperature=True), 400, "invalid_request_error", "temperature", ["true"]),
    "temperature-nan": ("chat", _chat(temperature=float("nan")), 400, "invalid_request_error", "temperature",
                        ["NaN"]),
    "temperature-str": ("completion", _cmpl(temperature="hot"), 400, "invalid_request_error", "temperature", ["hot"]),
    "top-p-zero": ("chat", _chat(top_p=0), 400, "invalid_request_error", "top_p", ["0", "(0, 1]"]),
    "top-p-high": ("completion", _cmpl(top_p=1.01), 400, "invalid_request_error", "top_p", ["1.01"]),
    "top-k-low": ("chat", _chat(top_k=-2), 400, "invalid_request_error", "top_k", ["-2"]),
    "top-k-float": ("completion", _cmpl(top_k=4.5), 400, "invalid_request_error", "top_k", ["4.5"]),
    "min-p-high": ("chat", _chat(min_p=1.5), 400, "invalid_request_error", "min_p", ["1.5"]),
    "presence-penalty": ("chat", _chat(presence_penalty=2.5), 400, "invalid_request_error", "presence_penalty",
                         ["2.5", "[-2, 2]"]),
    "frequency-penalty": ("completion", _cmpl(frequency_penalty=-3), 400, "invalid_request_error",
                          "frequency_penalty", ["-3"]),
    "n-zero": ("chat", _chat(n=0), 400, "invalid_request_error", "n", ["0", "[1, 16]"]),
    "n-too-many": ("completion", _cmpl(n=17), 400, "invalid_request_error", "n", ["17"]),
    "n-bool": ("chat", _chat(n=True), 400, "invalid_request_error", "n", ["true"]),
    "stop-empty": ("chat", _chat(stop=""), 400, "invalid_request_error", "stop", ['""', "non-empty"]),
    "stop-five": ("completion", _cmpl(stop=list("abcde")), 400, "invalid_request_error", "stop", ["at most 4"]),
    "stop-number": ("chat", _chat(stop=[5]), 400, "invalid_request_error", "stop", ["[5]"]),
    "seed-str": ("chat", _chat(seed="x"), 400, "invalid_request_error", "seed", ['"x"']),
    "seed-huge": ("completion", _cmpl(seed=2 ** 70), 400, "invalid_request_error", "seed", [str(2 ** 70)[:10]]),
    "seed-bool": ("chat", _chat(seed=False), 400, "invalid_request_error", "seed", ["false"]),
    "cmpl-logprobs-high": ("completion", _cmpl(logprobs=6), 400, "invalid_request_error", "logprobs", ["6", "[0, 5]"]),
    "cmpl-logprobs-bool": ("completion", _cmpl(logprobs=True), 400, "invalid_request_error", "logprobs", ["true"]),
    "chat-logprobs-int": ("chat", _chat(logprobs=1), 400, "invalid_request_error", "logprobs", ["1", "true or false"]),
    "top-logprobs-high": ("chat", _chat(logprobs=True, top_logprobs=21), 400, "invalid_request_error",
                          "top_logprobs", ["21", "[0, 20]"]),
    "top-logprobs-alone": ("chat", _chat(top_logprobs=2), 400, "invalid_request_error", "top_logprobs",
                           ["'logprobs'"]),
    "stream-str": ("chat", _chat(stream="yes"), 400, "invalid_request_error", "stream", ['"yes"']),
    "stream-options-no-stream": ("completion", _cmpl(stream_options={"include_usage": True}), 400,
                                 "invalid_request_error", "stream_options", ["'stream'"]),
    "stream-options-list": ("chat", _chat(stream=True, stream_options=[1]), 400, "invalid_request_error",
                            "stream_options", ["include_usage"]),
    "stream-options-bad-usage": ("chat", _chat(stream=True, stream_options={"include_usage": "y"}), 400,
                                 "invalid_request_error", "stream_options.include_usage", ['"y"']),
    "stream-options-unknown": ("chat", _chat(stream=True, stream_options={"chunk": 1}), 400,
                               "invalid_request_error", "stream_options.chunk", ["unknown"]),
    "ignore-eos-int": ("completion", _cmpl(ignore_eos=1), 400, "invalid_request_error", "ignore_eos", ["1"]),
    "echo-int": ("completion", _cmpl(echo=1), 400, "invalid_request_error", "echo", ["1", "true or false"]),
    "max-tokens-0-no-echo": ("completion", _cmpl(max_tokens=0), 400, "invalid_request_error", "max_tokens",
                             ["0", ">= 1"]),
    "prompt-logprobs-high": ("completion", _cmpl(prompt_logprobs=21), 400, "invalid_request_error",
                             "prompt_logprobs", ["21", "[0, 20]"]),
    "best-of": ("completion", _cmpl(best_of=3), 400, "invalid_request_error", "best_of", ["3", "not supported"]),
    "suffix-no-fim-tokens": ("completion", _cmpl(suffix="}"), 400, "invalid_request_error", "suffix",
                             ["fill-in-the-middle", "<｜fim▁hole｜>", "lacks"]),
    "suffix-int": ("completion", _cmpl(suffix=5), 400, "invalid_request_error", "suffix", ["5", "string"]),
    "tool-choice-bad": ("chat", _chat(tools=[_F], tool_choice="always"), 400, "invalid_request_error",
                        "tool_choice", ["always", "required"]),
    "tool-choice-unknown-name": ("chat", _chat(tools=[_F], tool_choice={"type": "function", "function": {"name": "g"}}),
                                 400, "invalid_request_error", "tool_choice.function.name", ["g", "no function"]),
    "tool-choice-named-and-schema": ("chat", _chat(tools=[_F], tool_choice={"type": "function", "function": {"name": "f"}},
                                                   response_format={"type": "json_object"}), 400,
                                     "invalid_request_error", "tool_choice", ["cannot be combined"]),
    "tool-choice-no-tools": ("chat", _chat(tool_choice="auto"), 400, "invalid_request_error", "tool_choice",
                             ["auto", "only allowed when 'tools'"]),
    "tools-too-many": ("chat", _chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]),
                       400, "invalid_request_error", "tools", ["129", "at most 128", "max_tools"]),
    "tools-too-big": ("chat", _chat(tools=[{"type": "function", "function": {
                          "name": "f", "description": "d" * 70000}}]), 400, "invalid_request_error", "tools",
                      ["at most 65536"]),
    "tool-bad-name": ("chat", _chat(tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
                      "invalid_request_error", "tools[0].function.name", ["a b"]),
    "tool-not-function": ("chat", _chat(tools=[{"type": "retrieval"}]), 400, "invalid_request_error", "tools[0]",
                          ["retrieval"]),
    "tool-names-repeat": ("chat", _chat(tools=[_F, _F]), 400, "invalid_request_error", "tools", ["unique"]),
    "functions": ("chat", _chat(functions=[{"name": "f"}]), 400, "invalid_request_error", "functions",
                  ["not supported"]),
    "response-format-type": ("chat", _chat(response_format={"type": "yaml"}), 400, "invalid_request_error",
                             "response_format", ["yaml", "json_schema"]),
    "response-format-no-schema": ("chat", _chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
                                  400, "invalid_request_error", "response_format.json_schema", ["schema"]),
    "schema-does-not-compile": ("chat", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}), 400,
        "invalid_request_error", "response_format.json_schema.schema", ["does not compile"]),
    "regex-does-not-compile": ("completion", _cmpl(structured_outputs={"regex": "(ab"}), 400, "invalid_request_error",
                               "structured_outputs.regex", ["does not compile"]),
    "structured-two-kinds": ("chat", _chat(structured_outputs={"regex": "a", "choice": ["a"]}), 400,
                             "invalid_request_error", "structured_outputs", ["exactly one"]),
    "structured-choice-empty": ("chat", _chat(structured_outputs={"choice": []}), 400, "invalid_request_error",
                                "structured_outputs.choice", ["non-empty strings"]),
    "structured-and-format": ("chat", _chat(structured_outputs={"choice": ["a"]}, response_format={"type": "json_object"}),
                              400, "invalid_request_error", "structured_outputs", ["not both"]),
    "logit-bias-list": ("completion", _cmpl(logit_bias=[5]), 400, "invalid_request_error", "logit_bias",
                        ["token ids to biases"]),
    "logit-bias-301": ("completion", _cmpl(logit_bias={str(i): 1 for i in range(301)}), 400,
                       "invalid_request_error", "logit_bias", ["301", "at most 300"]),
    "logit-bias-key-vocab": ("chat", _chat(logit_bias={"320": 1}), 400, "invalid_request_error", "logit_bias.320",
                             ["[0, 320)"]),
    "logit-bias-key-word": ("chat", _chat(logit_bias={"a": 1}), 400, "invalid_request_error", "logit_bias.a",
                            ["token ids"]),
    "logit-bias-value": ("completion", _cmpl(logit_bias={"5": 101}), 400, "invalid_request_error", "logit_bias.5",
                         ["101", "[-100, 100]"]),
    "logit-bias-bool": ("completion", _cmpl(logit_bias={"5": True}), 400, "invalid_request_error", "logit_bias.5",
                        ["[-100, 100]"]),
    # DeepSeek / vLLM fields not served yet: each a 400 naming the field (README's endpoint list)
    "guided-json": ("chat", _chat(guided_json={}), 400, "invalid_request_error", "guided_json", ["Unrecognized"]),
    "chat-prompt-logprobs-stream": ("chat", _chat(prompt_logprobs=1, stream=True), 400, "invalid_request_error",
                                    "prompt_logprobs", ["not available", "stream"]),
    "chat-template-kwargs-list": ("chat", _chat(chat_template_kwargs=["thinking"]), 400, "invalid_request_error",
                                  "chat_template_kwargs", ["thinking", "object"]),
    "chat-template-kwargs-nested": ("chat", _chat(chat_template_kwargs={"thinking": {"a": 1}}), 400,
                                    "invalid_request_error", "chat_template_kwargs.thinking", ["boolean"]),
    "reasoning-effort": ("chat", _chat(reasoning_effort="low"), 400, "invalid_request_error", "reasoning_effort",
                         ["Unrecognized"]),
    "chat-prefix-not-last": ("chat", _chat(messages=[{"role": "assistant", "content": "x", "prefix": True},
                                                     {"role": "user", "content": "hi"}]), 400,
                             "invalid_request_error", "messages[0].prefix", ["only the last message"]),
    "chat-prefix-user": ("chat", _chat(messages=[{"role": "user", "content": "hi", "prefix": True}]), 400,
                         "invalid_request_error", "messages[0].prefix", ["an assistant's"]),
    "chat-prefix-empty": ("chat", _chat(messages=[{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "", "prefix": True}]), 400,
                          "invalid_request_error", "messages[1].content", ["non-empty"]),
    "chat-prefix-str": ("chat", _chat(messages=[{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "x", "prefix": "yes"}]), 400,
                        "invalid_request_error", "messages[1].prefix", ["true or false"]),
    "unknown-field": ("chat", _chat(frobnicate=1), 400, "invalid_request_error", "frobnicate",
                      ["Unrecognized request argument supplied: frobnicate"]),
    "chat-field-in-cmpl": ("completion", _cmpl(messages=[]), 400, "invalid_request_error", "messages",
                           ["Unrecognized", "messages"]),
    "cmpl-field-in-chat": ("chat", _chat(prompt="x"), 400, "invalid_request_error", "prompt",
                           ["Unrecognized", "prompt"]),
    "messages-missing": ("chat", {"model": "tiny"}, 400, "invalid_request_error", "messages", ["'messages'"]),
    "messages-empty": ("chat", _chat(messages=[]), 400, "invalid_request_error", "messages", ["non-empty"]),
    "messages-str": ("chat", _chat(messages="hi"), 400, "invalid_request_error", "messages", ['"hi"']),
    "message-not-object": ("chat", _chat(messages=[5]), 400, "invalid_request_error", "messages[0]", ["5"]),
    "role-function": ("chat", _chat(messages=[{"role": "user", "content": "a"}, {"role": "function", "content": "b"}]),
                      400, "invalid_request_error", "messages[1].role", ['"function"', "system, user, assistant, tool"]),
    "role-missing": ("chat", _chat(messages=[{"content": "a"}]), 400, "invalid_request_error", "messages[0].role",
                     ["null"]),
    "content-null": ("chat", _chat(messages=[{"role": "user", "content": None}]), 400, "invalid_request_error",
                     "messages[0].content", ["null"]),
    "content-image": ("chat", _chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400,
        "invalid_request_error", "messages[0].content[1]", ["image_url", "text"]),
    "content-part-not-str": ("chat", _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
                             400, "invalid_request_error", "messages[0].content[0]", ["5"]),
    "message-tool-calls": ("chat", _chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
                                                   {"role": "user", "content": "x"}]), 400, "invalid_request_error",
                           "messages[0].tool_calls[0]", ["arguments"]),
    "tool-message-no-id": ("chat", _chat(messages=[{"role": "tool", "content": "22C"}]), 400, "invalid_request_error",
                           "messages[0].tool_call_id", ["tool_call_id"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests(name, info):
    kind, body, status, etype, param, fragments = BAD[name]
    parse = parse_chat_request if kind == "chat" else parse_completion_request
    with pytest.raises(APIError) as e:
        parse(body, info)
    err = e.value
    assert (err.status, err.type, err.param) == (status, etype, param), err.to_dict()
    for f in fragments:
        assert f in err.message, (f, err.message)
    assert err.to_dict() == {"error": {"message": err.message, "type": etype, "param": param, "code": err.code}}
    if status == 404:
        assert err.code == "model_not_found"


def test_no_tokenizer(tok):
    bare = ModelInfo("raw", MAX_LEN, VOCAB, None)
    spec = parse_completion_request({"model": "raw", "prompt": [[5, 6], [7]]}, bare)
    assert spec.prompts == [(None, [5, 6]), (None, [7])]
    for parse, body in ((parse_completion_request, {"model": "raw", "prompt": "hi"}),
                        (parse_chat_request, {"model": "raw", "messages": [{"role": "user", "content": "hi"}]})):
        with pytest.raises(APIError) as e:
            parse(body, bare)
        assert e.value.status == 400 and "tokenizer" in e.value.message


def test_logit_bias_parses_to_sorted_pairs(info):
    spec = parse_completion_request(_cmpl(logit_bias={"7": -100, "5": 2.5, "319": 100}), info)
    assert spec.params.logit_bias == ((5, 2.5), (7, -100.0), (319, 100.0))
    assert parse_completion_request(_cmpl(), info).params.logit_bias == ()


def test_structured_outputs_parse_to_a_constraint(info):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spec = parse_chat_request(_chat(response_format={"type": "json_schema",
                                                     "json_schema": {"name": "A", "schema": schema, "strict": True}}), info)
    assert spec.params.structured[0] == "json" and json.loads(spec.params.structured[1]) == schema
    assert parse_chat_request(_chat(response_format={"type": "json_object"}), info).params.structured == ("json", "")
    assert parse_chat_request(_chat(response_format={"type": "text"}), info).params.structured is None
    got = parse_completion_request(_cmpl(structured_outputs={"choice": ["yes", "no"]}), info).params.structured
    assert got == ("choice", '["yes", "no"]')
    assert parse_completion_request(_cmpl(structured_outputs={"regex": "[a-z]+"}), info).params.structured == \
        ("regex", "[a-z]+")


def test_sampling_params_error_becomes_400(info, monkeypatch):
    def boom(**kw):
        raise ValueError("SamplingParams.top_k=3: rejected by a newer rule")
    monkeypatch.setattr(proto, "SamplingParams", boom)
    with pytest.raises(APIError) as e:
        parse_completion_request(_cmpl(top_k=3), info)
    assert (e.value.status, e.value.param) == (400, "top_k") and "newer rule" in e.value.message


def test_completion_parses(info, tok):
    spec = parse_completion_request(_cmpl(prompt="héllo", max_tokens=5, temperature=0.5, top_p=0.9, top_k=-1,
                                          min_p=0.1, presence_penalty=1, frequency_penalty=-0.5, stop="\n", seed=7,
                                          logprobs=3, ignore_eos=True, n=2, stream=True,
                                          stream_options={"include_usage": True}), info)
    assert spec.kind == "completion" and spec.model == "tiny" and spec.n == 2
    assert spec.stream and spec.include_usage and spec.logprobs == 3
    assert spec.prompts == [("héllo", tok.encode("héllo"))] and spec.prompts[0][1][0] == 0  # BOS added
    p = spec.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (5, 0.5, 0.9, -1, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.stop, p.seed, p.logprobs, p.ignore_eos) == \
           (1.0, -0.5, ("\n",), 7, 3, True)


def test_completion_prompt_shapes_and_defaults(info, tok):
    ids = parse_completion_request(_cmpl(prompt=[5, 6, 7]), info)
    assert ids.prompts == [(None, [5, 6, 7])] and ids.params.max_tokens == 16 and ids.params.logprobs is None
    many = parse_completion_request(_cmpl(prompt=[[5], [6, 319]]), info)
    assert many.prompts == [(None, [5]), (None, [6, 319])]
    texts = parse_completion_request(_cmpl(prompt=["a", "bc"], stop=["x", "yz"]), info)
    assert texts.prompts == [("a", tok.encode("a")), ("bc", tok.encode("bc"))] and texts.params.stop == ("x", "yz")
    # nulls are absent; harmless fields are ignored
    quiet = parse_completion_request(_cmpl(temperature=None, stream_options=None, user="u", metadata={"a": "b"},
                                           store=False, service_tier="auto", logit_bias={}, echo=False, best_of=1,
                                           suffix=None, seed=None), info)
    assert quiet.params.temperature == 1.0 and not quiet.stream and not quiet.include_usage


def test_chat_parses(info, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo", "refusal": None, "tool_calls": None},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "me"}]
    spec = parse_chat_request(_chat(messages=msgs, logprobs=True, top_logprobs=4, temperature=0, n=3,
                                    parallel_tool_calls=True, tools=None, response_format={"type": "text"}), info)
    text, ids = spec.prompts[0]
    assert text == "<｜begin▁of▁sentence｜>be brief<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>" \
                   "<｜User｜>a\nb<｜Assistant｜>"
    assert ids == tok.encode(text, add_special_tokens=False) and ids.count(0) == 1  # one BOS, from the template
    assert spec.kind == "chat" and spec.n == 3 and spec.logprobs is True and spec.top_logprobs == 4
    assert spec.params.logprobs == 4 and spec.params.temperature == 0.0
    assert spec.params.max_tokens == MAX_LEN - len(ids)  # chat's default: the rest of the context
    assert parse_chat_request(_chat(logprobs=True), info).params.logprobs == 0
    assert parse_chat_request(_chat(logprobs=False), info).params.logprobs is None
    both = parse_chat_request(_chat(max_tokens=9, max_completion_tokens=3), info)
    assert both.params.max_tokens == 3


def test_context_length(info):
    ok = parse_completion_request(_cmpl(prompt=list(range(5, 59)), max_tokens=10), info)  # 54 + 10 == 64
    assert ok.params.max_tokens == 10
    with pytest.raises(APIError) as e:
        parse_completion_request(_cmpl(prompt=[[5], list(range(5, 65))], max_tokens=10), info)
    assert e.value.message.startswith("This model's maximum context length is 64 tokens. However, you requested "
                                      "70 tokens (60 in the prompt, 10 for the completion).")
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "prompt")
    with pytest.raises(APIError) as e:  # the default 16 counts too
        parse_completion_request(_cmpl(prompt=list(range(5, 55))), info)
    assert "requested 66 tokens (50 in the prompt, 16 for the completion)" in e.value.message
    with pytest.raises(APIError) as e:
        parse_chat_request(_chat(max_tokens=60), info)
    assert "However, you requested 65 tokens (5 in the messages, 60 for the completion)" in e.value.message
    with pytest.raises(APIError) as e:  # 3 template tokens + 61 text tokens fill the context
        parse_chat_request(_chat(messages=[{"role": "user", "content": "x" * 61}]), info)
    assert "your messages resulted in 64 tokens" in e.value.message and e.value.param == "messages"
    fits = parse_chat_request(_chat(messages=[{"role": "user", "content": "x" * 60}]), info)
    assert fits.params.max_tokens == 1


# ---- chat template ----

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
     {"role": "user", "content": "ünï ✓ 🙂"}],
]
# Exercises what real templates use: whitespace control, namespace, loop controls, tojson,
# raise_exception, special-token variables.
STRICT_TEMPLATE = """{% set ns = namespace(sys='', turn=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% set ns.sys = ns.sys + m['content'] %}{% continue %}{% endif %}
    {% if (m['role'] == 'user') != (ns.turn % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set ns.turn = ns.turn + 1 %}
{% endfor %}
{{ bos_token }}{{ ns.sys }}
{% for m in messages if m['role'] != 'system' %}
    {% if m['role'] == 'user' %}
<｜User｜>{{ m['content'] }} {{ {'n': loop.index} | tojson }}
    {% else %}
<｜Assistant｜>{{ m['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"""


def _checkpoint_with_template(tmp_path, template):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(os.path.join(TINY, "tokenizer.json"), d)
    cfg = json.load(open(os.path.join(TINY, "tokenizer_config.json")))
    if template is None:
        cfg.pop("chat_template")
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return str(d)


def _hf(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("template", ["preset", "strict"])
def test_chat_template_matches_transformers(template, tok, tmp_path):
    path = TINY if template == "preset" else _checkpoint_with_template(tmp_path, STRICT_TEMPLATE)
    ours, hf = load_tokenizer(path), _hf(path)
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == \
                   hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def test_chat_template_errors_become_400(tmp_path):
    tok = load_tokenizer(_checkpoint_with_template(tmp_path, STRICT_TEMPLATE))
    info = ModelInfo("tiny", MAX_LEN, VOCAB, tok)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(APIError) as e:
        parse_chat_request(_chat(messages=bad), info)
    assert (e.value.status, e.value.param) == (400, "messages") and "must alternate" in e.value.message


def test_fallback_template(tok, tmp_path):
    bare = load_tokenizer(_checkpoint_with_template(tmp_path, None))
    for msgs in CONVERSATIONS:
        assert bare.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


# ---- single tokens ----

def test_token_bytes_round_trip(tok):
    for s in ["hello world", "héllo wörld", "日本語のテキスト", "emoji 🙂👍🏽 mix", "tabs\tand\nnewlines\r\n",
              "\x00\x7f"]:
        ids = tok.encode(s)
        assert ids[0] == 0
        assert b"".join(tok.token_bytes(i) for i in ids[1:]) == s.encode("utf-8")
    assert [tok.token_bytes(5 + b) for b in range(256)] == [bytes([b]) for b in range(256)]
    assert tok.token_bytes(0) == "<｜begin▁of▁sentence｜>".encode()
    assert tok.is_special(0) and not tok.is_special(5)
    assert tok.id_to_token(5 + 32) == "Ġ"  # the vocabulary's own spelling of a space
    assert tok.token_bytes(300) == b"" and tok.id_to_token(300) is None  # beyond the tokenizer's 261 ids


# ---- responses ----

def _lps(ids, extra=((7, -3.0), (8, -4.0))):
    return [{t: -0.25, **{a: v for a, v in extra if a != t}} for t in ids]


def test_completion_response_validates(tok):
    ids = tok.encode("é!", add_special_tokens=False) + [300, 1]  # half characters, unknown id, EOS
    choices = [ChoiceResult(1, [5 + 65], "A", None, "length", 10, 4),
               ChoiceResult(0, ids, "é!", _lps(ids), "abort", 10, 6)]
    usage = usage_for(choices, n=2)
    assert usage == usage_dict(10, 6, 4)
    resp = Completion.model_validate(completion_response("cmpl-1", 123, "tiny", choices, usage, tok))
    assert [c.index for c in resp.choices] == [0, 1] and [c.finish_reason for c in resp.choices] == ["stop", "length"]
    lp = resp.choices[0].logprobs
    assert lp.tokens == ["bytes:\\xc3", "bytes:\\xa9", "!", "token_id:300", "<｜end▁of▁sentence｜>"]
    assert lp.token_logprobs == [-0.25] * 5 and lp.text_offset == [0, 0, 1, 2, 2]
    assert list(lp.top_logprobs[2]) == ["!", "\x02", "\x03"]  # best first, sampled token included
    assert resp.choices[1].logprobs is None
    u = resp.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (10, 6, 16)
    assert u.prompt_tokens_details.cached_tokens == 4
    assert (u.model_extra["prompt_cache_hit_tokens"], u.model_extra["prompt_cache_miss_tokens"]) == (4, 6)


def test_chat_response_validates(tok):
    ids = tok.encode("hé", add_special_tokens=False)
    choice = ChoiceResult(0, ids, "hé", _lps(ids), "stop", 5, 0)
    resp = ChatCompletion.model_validate(chat_response("chatcmpl-1", 5, "tiny", [choice], usage_for([choice]), tok,
                                                       top_logprobs=2))
    assert resp.object == "chat.completion" and resp.choices[0].message.content == "hé"
    content = resp.choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content) == "hé".encode()
    assert [c.token for c in content] == ["h", "bytes:\\xc3", "bytes:\\xa9"]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == -0.25 for c in content)
    assert resp.usage.prompt_tokens_details.cached_tokens == 0 and resp.usage.total_tokens == 8
    nolp = ChatCompletion.model_validate(chat_response("c", 5, "tiny", [ChoiceResult(0, [], "", None, "weird")],
                                                       usage_dict(1, 0)))
    assert nolp.choices[0].finish_reason == "stop" and nolp.choices[0].logprobs is None


def test_chunks_validate(tok):
    first = ChatCompletionChunk.model_validate(chat_chunk("c", 1, "tiny", 0, "", None, role="assistant"))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    lp = chat_logprobs(tok, [5 + 104], [{5 + 104: float("-inf")}], 0)
    mid = ChatCompletionChunk.model_validate(chat_chunk("c", 1, "tiny", 1, "h", None, logprobs=lp))
    assert mid.choices[0].delta.content == "h" and mid.choices[0].logprobs.content[0].logprob == -9999.0
    last = ChatCompletionChunk.model_validate(chat_chunk("c", 1, "tiny", 0, None, "length"))
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    u = ChatCompletionChunk.model_validate(usage_chunk("chat", "c", 1, "tiny", usage_dict(3, 2, 1)))
    assert u.choices == [] and u.usage.prompt_tokens_details.cached_tokens == 1
    clp = completion_logprobs(tok, [5 + 104], [{5 + 104: -0.1}], text_offset=7)
    c = Completion.model_validate(completion_chunk("cmpl", 1, "tiny", 0, "h", "stop", clp, usage_dict(3, 1)))
    assert c.choices[0].logprobs.text_offset == [7] and c.usage.total_tokens == 4
    cu = Completion.model_validate(usage_chunk("completion", "cmpl", 1, "tiny", usage_dict(3, 1)))
    assert cu.choices == [] and cu.object == "text_completion"


def test_sse_framing():
    frame = sse({"a": "ü", "b": [1, None]})
    assert frame == 'data: {"a":"ü","b":[1,null]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert sse(APIError(400, "bad", param="n").to_dict()).startswith(b'data: {"error":{"message":"bad"')


def test_models_response():
    out = models_response([ModelInfo("tiny", 64, 320, None, 17)])
    assert out["object"] == "list" and Model.model_validate(out["data"][0]).id == "tiny"


# ---- end to end through the official client (mock transport, no server) ----

def _client(handler):
    return openai.OpenAI(api_key="x", base_url="http://127.0.0.1/v1", max_retries=0,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def test_official_client_round_trip(info, tok):
    from rayinfer import LLM

    llm = LLM("tiny")

    def handler(request):
        body = json.loads(request.content)
        chat = request.url.path.endswith("/chat/completions")
        try:
            spec = (parse_chat_request if chat else parse_completion_request)(body, info)
        except APIError as e:
            return httpx2.Response(e.status, json=e.to_dict())
        outs = llm.generate([ids for _, ids in spec.prompts], spec.params, use_tqdm=False)
        choices = [ChoiceResult(i, o.token_ids, o.text, o.logprobs, o.finish_reason, len(o.prompt_token_ids),
                                o.num_cached_tokens) for i, o in enumerate(outs)]
        usage = usage_for(choices, spec.n)
        if not spec.stream:
            shape = chat_response if chat else completion_response
            extra = {"top_logprobs": spec.top_logprobs} if chat else {}
            return httpx2.Response(200, json=shape("id-1", 1, spec.model, choices, usage, tok, **extra))
        frames = []
        for c in choices:
            lp = None if c.logprobs is None else chat_logprobs(tok, c.token_ids, c.logprobs, spec.top_logprobs)
            frames += [chat_chunk("id-1", 1, spec.model, c.index, "", None, role="assistant"),
                       chat_chunk("id-1", 1, spec.model, c.index, c.text, None, logprobs=lp),
                       chat_chunk("id-1", 1, spec.model, c.index, None, c.finish_reason)]
        if spec.include_usage:
            frames.append(usage_chunk("chat", "id-1", 1, spec.model, usage))
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=b"".join(map(sse, frames)) + SSE_DONE)

    client = _client(handler)
    resp = client.completions.create(model="tiny", prompt=["hello", "wor"], max_tokens=6, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert len(resp.choices) == 2 and all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 12 and resp.usage.prompt_tokens == 6 + 4
    assert all(len(c.logprobs.tokens) == 6 for c in resp.choices)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 5
    toks = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(toks) == 5 and text.encode() == b"".join(bytes(t.bytes or b"") for t in toks)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found"


def test_structured_output_without_xgrammar_is_a_clear_400(info, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # what `import xgrammar` meets where it is not installed
    with pytest.raises(APIError) as e:
        parse_chat_request(_chat(response_format={"type": "json_object"}), info)
    assert e.value.status == 400 and "rayinfer[structured]" in str(e.value.to_dict()["error"]["message"])


def test_echo_and_prompt_logprobs_shapes(info, tok):
    """echo + logprobs 1 + vLLM's prompt_logprobs 2: the prompt's text and tokens lead the choice (first logprob
    null, as OpenAI returns it: the client's types are built without validation, so they carry the null), cut to 1
    alternative there and 2 in prompt_logprobs; streamed, they ride on the first chunk only."""
    from rayinfer.messages import Delta, fold_delta

    spec = parse_completion_request(_cmpl(prompt="hi", max_tokens=2, logprobs=1, echo=True, prompt_logprobs=2), info)
    assert spec.echo and spec.params.prompt_logprobs == 2 and spec.params.logprobs == 1
    ids = spec.prompts[0][1]  # BOS h i
    plp = [None] + [{t: -3.0, 7: -1.0, 8: -2.0} for t in ids[1:]]  # own token + the engine's top 2
    first = Delta("r", [5 + 33], "!", [{5 + 33: -0.1, 9: -0.2}], None, len(ids), 0, plp)
    last = Delta("r", [5 + 63], "?", [{5 + 63: -0.3}], "length", len(ids), 0)
    c = spec.choice(0)
    fold_delta(c, first)
    chunk1 = proto.completion_delta_chunk("cmpl", 1, "tiny", c, first, 0, tok)["choices"][0]
    fold_delta(c, last)
    chunk2 = proto.completion_delta_chunk("cmpl", 1, "tiny", c, last, 1, tok)["choices"][0]
    whole = completion_response("cmpl", 1, "tiny", [c], usage_for([c]), tok)["choices"][0]
    assert whole["text"] == "hi!?" and chunk1["text"] + chunk2["text"] == "hi!?"
    lp = whole["logprobs"]
    assert lp["tokens"] == ["<｜begin▁of▁sentence｜>", "h", "i", "!", "?"] and lp["text_offset"] == [0, 0, 1, 2, 3]
    assert lp["token_logprobs"] == [None, -3.0, -3.0, -0.1, -0.3] and lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {"h": -3.0, "\x02": -1.0}  # the prompt token plus the best 1
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert chunk1["logprobs"][key] + chunk2["logprobs"][key] == lp[key]
    vllm = whole["prompt_logprobs"]
    assert vllm[0] is None and vllm[1] == {"7": {"logprob": -1.0, "rank": 1, "decoded_token": "\x02"},
                                           "8": {"logprob": -2.0, "rank": 2, "decoded_token": "\x03"},
                                           str(ids[1]): {"logprob": -3.0, "rank": None, "decoded_token": "h"}}
    assert chunk1["prompt_logprobs"] == vllm and "prompt_logprobs" not in chunk2
    only = parse_completion_request(_cmpl(prompt=[5, 6], max_tokens=0, echo=True), info)
    assert only.params.max_tokens == 0 and only.params.prompt_logprobs is None  # no logprobs asked: none computed
    assert only.choice(0).prompt.text == tok.decode([5, 6])
