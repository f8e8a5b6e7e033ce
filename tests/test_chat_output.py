"""Reasoning and tool-call output at the chat front door, without Ray: which parser a served model gets (checkpoint
template or serve option), tools rendered into the prompt, and scripted DeepSeek outputs shaped into
`message.reasoning_content` / `content` / `tool_calls` and into stream chunks (reasoning deltas, then content, then
tool-call deltas), fed to the official `openai` client over a mock transport with the deltas split at every
character (so inside `<think>`, `</think>` and every tool-call token)."""
import json
import os
import shutil

import openai
import pytest

from rayinfer.config import ServeConfig
from rayinfer.model import resolve_model_path
from rayinfer.openai.markers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP
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


def _tok_with(tmp_path_factory, template):
    d = tmp_path_factory.mktemp("ckpt")
    shutil.copy(os.path.join(TINY, "tokenizer.json"), d)
    cfg = json.load(open(os.path.join(TINY, "tokenizer_config.json")))
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return load_tokenizer(str(d))


@pytest.fixture(scope="module")
def thinking_tok(tmp_path_factory):
    return _tok_with(tmp_path_factory, THINKING_TEMPLATE)


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
                                 message=lambda t: split_message(t, spec))
            return httpx2.Response(200, json=body)
        split = StreamSplit("id-1", 1, info.name, spec.n, spec)
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


TOOL_TEMPLATE = (  # renders the tools, an assistant turn's calls and the tool results, V3's way
    "{{ bos_token }}{% if tools %}## Tools{% for t in tools %}\n- {{ t.function.name }}: "
    "{{ t.function.get('parameters', {}) | tojson }}{% endfor %}\n{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% elif m['role'] == 'tool' %}"
    "<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>{% elif m['role'] == 'assistant' %}<｜Assistant｜>"
    "{{ m['content'] }}{% for c in m.get('tool_calls', []) %}<｜tool▁call▁begin｜>function<｜tool▁sep｜>"
    "{{ c.function.name }}\n```json\n{{ c.function.arguments }}\n```<｜tool▁call▁end｜>{% endfor %}"
    "<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}
CALLS_OUT = (f"Let me check.{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n"
             f'{{"city": "Paris"}}\n```{CALL_END}{CALL_BEGIN}function{TOOL_SEP}now\n```json\n{{}}\n```{CALL_END}'
             f"{CALLS_END}")
WANT_CALLS = [("get_weather", {"city": "Paris"}), ("now", {})]


@pytest.fixture(scope="module")
def tool_tok(tmp_path_factory):
    return _tok_with(tmp_path_factory, TOOL_TEMPLATE)


def test_tools_and_tool_history_are_rendered_by_the_template(tool_tok):
    info = ModelInfo("v3", 512, 320, tool_tok)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22C"}]
    spec = parse_chat_request({"model": "v3", "messages": history, "tools": [WEATHER, NOW]}, info)
    text = spec.prompts[0][0]
    assert "- get_weather: " in text and "- now: {}" in text and '"required": ["city"]' in text
    assert f'{TOOL_SEP}get_weather\n```json\n{{"city": "Paris"}}' in text and "22C<｜tool▁output▁end｜>" in text
    assert spec.tool_format == "v3"
    assert parse_chat_request({"model": "v3", "messages": history[:1], "tools": [WEATHER],
                               "tool_choice": "none"}, info).tool_format is None


def _calls(msg_calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in msg_calls]


def test_client_gets_tool_calls_with_finish_reason_tool_calls(tool_tok):
    info = ModelInfo("v3", 512, 320, tool_tok)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    client = _client(_server(info, [CALLS_OUT]))
    got = client.chat.completions.create(model="v3", messages=msgs, tools=[WEATHER, NOW], tool_choice="auto")
    choice = got.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", "Let me check.")
    assert _calls(choice.message.tool_calls) == WANT_CALLS
    assert len({c.id for c in choice.message.tool_calls}) == 2
    # tool_choice "none" (or no tools): the same output is plain content
    got = client.chat.completions.create(model="v3", messages=msgs, tools=[WEATHER], tool_choice="none")
    assert (got.choices[0].finish_reason, got.choices[0].message.content) == ("stop", CALLS_OUT)
    assert not got.choices[0].message.tool_calls


def _stream_calls(client, tools, **kw):
    content, calls, reasons, reasoning = "", {}, [], ""
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "?"}],
                                                stream=True, tools=tools, **kw):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert not any(reasons[:-1])
    return reasoning, content, [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())], reasons[-1]


def test_streamed_tool_call_deltas_at_every_split(tool_tok):
    info = ModelInfo("m", 512, 320, tool_tok)
    for pieces in _cuts(CALLS_OUT):
        got = _stream_calls(_client(_server(info, pieces)), [WEATHER, NOW])
        assert got == ("", "Let me check.", WANT_CALLS, "tool_calls"), pieces


def test_reasoning_then_tool_calls_streamed_and_not(thinking_tok):
    info = ModelInfo("m", 512, 320, thinking_tok, reasoning_parser="deepseek_r1")  # the prompt ends in <think>
    out = "Need the weather.</think>\n\n" + CALLS_OUT
    got = _client(_server(info, [out])).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "?"}], tools=[WEATHER, NOW])
    msg = got.choices[0].message
    assert (msg.reasoning_content, msg.content, _calls(msg.tool_calls)) == ("Need the weather.", "Let me check.",
                                                                           WANT_CALLS)
    for pieces in ([out], list(out)):
        assert _stream_calls(_client(_server(info, pieces)), [WEATHER, NOW]) == \
            ("Need the weather.", "Let me check.", WANT_CALLS, "tool_calls")


def test_named_tool_choice_constrains_to_its_parameters_and_returns_the_output_as_its_arguments(tool_tok):
    info = ModelInfo("m", 512, 320, tool_tok)
    body = {"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": [WEATHER, NOW],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    spec = parse_chat_request(body, info)
    assert spec.params.structured[0] == "json"
    assert json.loads(spec.params.structured[1]) == WEATHER["function"]["parameters"]
    args = '{"city": "Paris"}'  # what the grammar lets the model write
    got = _client(_server(info, [args])).chat.completions.create(**body).choices[0]
    assert (got.finish_reason, got.message.content, _calls(got.message.tool_calls)) == \
        ("stop", None, [("get_weather", {"city": "Paris"})])
    for pieces in ([args], list(args)):
        got = _stream_calls(_client(_server(info, pieces)), [WEATHER, NOW], tool_choice=body["tool_choice"])
        assert got == ("", "", [("get_weather", {"city": "Paris"})], "stop"), pieces


def test_required_tool_choice_is_a_list_of_calls_to_the_tools(tool_tok):
    info = ModelInfo("m", 512, 320, tool_tok)
    body = {"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": [WEATHER, NOW],
            "tool_choice": "required"}
    schema = json.loads(parse_chat_request(body, info).params.structured[1])  # compiled by xgrammar on the way
    assert (schema["type"], schema["minItems"], "maxItems" in schema) == ("array", 1, False)
    assert [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [["get_weather"], ["now"]]
    assert json.loads(parse_chat_request(dict(body, parallel_tool_calls=False), info).params.structured[1])[
        "maxItems"] == 1
    out = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "now", "parameters": {}}]'
    got = _client(_server(info, [out])).chat.completions.create(**body).choices[0]
    assert (got.finish_reason, got.message.content, _calls(got.message.tool_calls)) == ("tool_calls", None,
                                                                                         WANT_CALLS)
    for pieces in ([out], list(out)):
        got = _stream_calls(_client(_server(info, pieces)), [WEATHER, NOW], tool_choice="required")
        assert got == ("", "", WANT_CALLS, "tool_calls"), pieces
    cut = out[:20]  # max_tokens ran out before the list closed: the text is all there is
    got = _client(_server(info, [cut])).chat.completions.create(**body).choices[0]
    assert (got.message.content, got.message.tool_calls) == (cut, None)
    assert _stream_calls(_client(_server(info, list(cut))), [WEATHER], tool_choice="required")[1:3] == (cut, [])


# V3.1's switch, in the shape its template uses: thinking opens the reasoning, otherwise the prompt closes it.
HYBRID_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜>"
                   "{% if thinking is defined and thinking %}<think>{% else %}</think>{% endif %}")


def test_chat_template_kwargs_switch_v31_thinking(tmp_path_factory):
    tok = _tok_with(tmp_path_factory, HYBRID_TEMPLATE)
    info = ModelInfo("v31", 256, 320, tok, reasoning_parser=choose_reasoning_parser(None, tok))
    body = {"model": "v31", "messages": [{"role": "user", "content": "2+2?"}]}
    thinking = parse_chat_request(dict(body, chat_template_kwargs={"thinking": True}), info)
    plain = parse_chat_request(dict(body, chat_template_kwargs={"thinking": False}), info)
    assert thinking.prompts[0][0].endswith("<think>") and thinking.reasoning is True
    assert plain.prompts[0][0].endswith("</think>") and plain.reasoning is False
    assert parse_chat_request(dict(body, chat_template_kwargs={"messages": 1}), info).prompts == plain.prompts
    assert split_message(OUTPUT, thinking)[0]["reasoning_content"] == REASONING
    assert split_message("4", plain)[0] == {"role": "assistant", "content": "4", "reasoning_content": None}
