"""Reasoning output at the chat front door, without Ray: which parser a served model gets (checkpoint template or
serve option), and scripted R1-style outputs shaped into `message.reasoning_content` / `content` and into stream
chunks (reasoning deltas before content deltas), fed to the official `openai` client over a mock transport with
the deltas split at every character (so inside `<think>` and `</think>`)."""
import json
import os
import shutil

import openai
import pytest

from rayinfer.config import ServeConfig
from rayinfer.model import resolve_model_path
from rayinfer.openai.chat_output import StreamSplit, choose_reasoning_parser, split_message
from rayinfer.openai.protocol import (SSE_DONE, ChoiceResult, ModelInfo, chat_chunk, chat_response,
                                      parse_chat_request, sse, usage_for)
from rayinfer.tokenizer import load_tokenizer

try:  # the transport library the installed openai client is built on (3.x: httpx2, 1.x: httpx)
    import httpx2
except ImportError:
    import httpx as httpx2

TINY = resolve_model_path("tiny")
# A reasoning checkpoint's template, R1's way: the generation prompt opens the reasoning, and an assistant turn in
# the history keeps only what follows its `</think>`.
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}<｜Assistant｜>{{ c }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
OUTPUT = "Two and two.\nThat is 4.\n</think>\n\nThe answer is **4**."
REASONING, CONTENT = "Two and two.\nThat is 4.\n", "The answer is **4**."


@pytest.fixture(scope="module")
def thinking_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("r1ckpt")
    shutil.copy(os.path.join(TINY, "tokenizer.json"), d)
    cfg = json.load(open(os.path.join(TINY, "tokenizer_config.json")))
    cfg["chat_template"] = THINKING_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return load_tokenizer(str(d))


def test_parser_comes_from_the_template_or_the_serve_option(thinking_tok):
    plain = load_tokenizer(TINY)
    assert choose_reasoning_parser(None, thinking_tok) == "deepseek_r1"
    assert choose_reasoning_parser(None, plain) is None
    assert choose_reasoning_parser("deepseek_r1", plain) == "deepseek_r1"
    assert choose_reasoning_parser("none", thinking_tok) is None
    with pytest.raises(ValueError, match="reasoning_parser"):
        choose_reasoning_parser("qwen3", plain)
    assert ServeConfig.from_dict({}, reasoning_parser="deepseek_r1").reasoning_parser == "deepseek_r1"
    with pytest.raises(ValueError, match="reasoning_parser"):
        ServeConfig.from_dict({}, reasoning_parser="qwen3")


def test_request_knows_whether_its_output_starts_reasoning(thinking_tok):
    on = ModelInfo("r1", 256, 320, thinking_tok, reasoning_parser="deepseek_r1")
    history = [{"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},  # not sent back
               {"role": "user", "content": "and 3+3?"}]
    spec = parse_chat_request({"model": "r1", "messages": history}, on)
    assert spec.reasoning is True and "Two and two" not in spec.prompts[0][0]
    off = ModelInfo("tiny", 256, 320, load_tokenizer(TINY))
    assert parse_chat_request({"model": "tiny", "messages": history[:1]}, off).reasoning is None


def _client(handler):
    return openai.OpenAI(base_url="http://rayinfer.test/v1", api_key="x", max_retries=0,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def _server(info, pieces):
    """A chat endpoint whose model writes `pieces`, delivered to the shaping layer in `pieces`, as the ingress does."""
    def handler(request):
        spec = parse_chat_request(json.loads(request.content), info)
        text = "".join(pieces)
        choices = [ChoiceResult(i, list(range(len(pieces))), text, None, "stop", 5) for i in range(spec.n)]
        if not spec.stream:
            body = chat_response("id-1", 1, info.name, choices, usage_for(choices, spec.n),
                                 message=lambda t: split_message(t, spec.reasoning))
            return httpx2.Response(200, json=body)
        split = StreamSplit("id-1", 1, info.name, spec.n, spec.reasoning)
        frames = [chat_chunk("id-1", 1, info.name, 0, "", None, role="assistant")]
        for k, piece in enumerate(pieces):
            frames += split.chunks(0, piece, "stop" if k == len(pieces) - 1 else None)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=b"".join(map(sse, frames)) + SSE_DONE)
    return handler


def test_client_gets_reasoning_content_and_content(thinking_tok):
    info = ModelInfo("r1", 256, 320, thinking_tok, reasoning_parser="deepseek_r1")
    msgs = [{"role": "user", "content": "2+2?"}]
    got = _client(_server(info, [OUTPUT])).chat.completions.create(model="r1", messages=msgs)
    assert (got.choices[0].message.reasoning_content, got.choices[0].message.content) == (REASONING, CONTENT)
    # the same checkpoint served with --reasoning-parser none: everything is content
    raw = ModelInfo("r1", 256, 320, thinking_tok)
    got = _client(_server(raw, [OUTPUT])).chat.completions.create(model="r1", messages=msgs)
    assert got.choices[0].message.content == OUTPUT and getattr(got.choices[0].message, "reasoning_content",
                                                                 None) is None


def _cuts(text):
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


@pytest.mark.parametrize("output,want", [
    (OUTPUT, (REASONING, CONTENT)),
    ("Cut off at </thi", ("Cut off at </thi", "")),  # a marker's start held back, then sent as reasoning at the end
])
def test_stream_sends_reasoning_deltas_then_content_deltas_at_every_split(thinking_tok, output, want):
    info = ModelInfo("r1", 256, 320, thinking_tok, reasoning_parser="deepseek_r1")
    for pieces in _cuts(output):
        stream = _client(_server(info, pieces)).chat.completions.create(
            model="r1", messages=[{"role": "user", "content": "2+2?"}], stream=True)
        kinds, reasoning, content, reasons = [], "", "", []
        for chunk in stream:
            delta = chunk.choices[0].delta
            r = getattr(delta, "reasoning_content", None)
            if r:
                kinds.append("r")
                reasoning += r
            if delta.content:
                kinds.append("c")
                content += delta.content
            reasons.append(chunk.choices[0].finish_reason)
        assert (reasoning, content) == want, pieces
        assert kinds == sorted(kinds, reverse=True), pieces  # every reasoning delta before any content delta
        assert reasons[-1] == "stop" and not any(reasons[:-1]), pieces
