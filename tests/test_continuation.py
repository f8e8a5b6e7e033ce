"""DeepSeek's chat prefix completion and FIM completion on a DeepSeek-format checkpoint (tests/deepseek_format.py),
without Ray: the prompts built (V3's and R1's template layouts), their 400s, and the official `openai` client over a
mock transport whose handler parses, runs an offline engine on the checkpoint and shapes the response."""
import json

import openai
import pytest

from deepseek_format import deepseek_checkpoint
from rayinfer import LLM, SamplingParams
from rayinfer.openai.markers import FIM_BEGIN, FIM_END, FIM_HOLE
from rayinfer.openai.protocol import (APIError, ChoiceResult, ModelInfo, chat_response, completion_response,
                                      parse_chat_request, parse_completion_request, usage_for)
from rayinfer.tokenizer import load_tokenizer

try:  # the transport library the installed openai client is built on (3.x: httpx2, 1.x: httpx)
    import httpx2
except ImportError:
    import httpx as httpx2

ASK = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Quicksort?"}]
PREFIX = {"role": "assistant", "content": "```python\n", "prefix": True}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {t: deepseek_checkpoint(str(tmp_path_factory.mktemp(t)), t) for t in ("v3", "r1", "v31")}


def _info(path) -> ModelInfo:
    return ModelInfo("ds", 4096, 320, load_tokenizer(path))


@pytest.mark.parametrize("template,opened", [("v3", ""), ("r1", "<think>\n"), ("v31", "</think>")])
def test_prefix_prompt_ends_with_the_assistant_text(ckpts, template, opened):
    info = _info(ckpts[template])
    spec = parse_chat_request({"model": "ds", "messages": ASK + [PREFIX]}, info)
    text = spec.prompts[0][0]
    # the turn is open: the template's end of turn after the prefix is gone; the reply is rendered as a past one
    # (R1: no <think> opened; V3.1: reasoning closed, as its past replies are)
    start = "<｜begin▁of▁sentence｜>Be terse.<｜User｜>Quicksort?<｜Assistant｜>"
    assert text == start + ("</think>" if template == "v31" else "") + "```python\n"
    assert spec.prompts[0][1] == info.tokenizer.encode(text, add_special_tokens=False)
    assert parse_chat_request({"model": "ds", "messages": ASK}, info).prompts[0][0] == start + opened


def test_fim_prompt_uses_the_checkpoint_fim_tokens(ckpts):
    info = _info(ckpts["v3"])
    tok = info.tokenizer
    spec = parse_completion_request({"model": "ds", "prompt": ["def f(x):\n", "a"], "suffix": "\n    return y",
                                     "max_tokens": 4}, info)
    want = f"{FIM_BEGIN}def f(x):\n{FIM_HOLE}\n    return y{FIM_END}"
    assert spec.prompts[0] == (want, tok.encode(want)) and len(spec.prompts) == 2
    fb, fh, fe = (tok.token_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END))
    plain = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert spec.prompts[0][1] == [0, fb] + plain("def f(x):\n") + [fh] + plain("\n    return y") + [fe]
    for body, param, fragment in (({"prompt": [5, 6], "suffix": "x"}, "prompt", "list of strings"),
                                  ({"prompt": "a", "suffix": "x", "echo": True}, "echo", "suffix")):
        with pytest.raises(APIError) as e:
            parse_completion_request({"model": "ds", **body}, info)
        assert e.value.param == param and fragment in e.value.message


def test_official_client_gets_the_continuations(ckpts):
    """The model's output follows the built prompt: what the client receives is the offline engine's output for
    exactly that prompt (the response holds only the continuation, as DeepSeek's API returns it)."""
    path = ckpts["v3"]
    info, llm = _info(path), LLM(path)
    prompts = []

    def handler(request):
        chat = request.url.path.endswith("/chat/completions")
        spec = (parse_chat_request if chat else parse_completion_request)(json.loads(request.content), info)
        prompts.append(spec.prompts[0][1])
        o = llm.generate([spec.prompts[0][1]], spec.params, use_tqdm=False)[0]
        c = [ChoiceResult(0, o.token_ids, o.text, None, o.finish_reason, len(o.prompt_token_ids))]
        return httpx2.Response(200, json=(chat_response if chat else completion_response)(
            "id", 1, "ds", c, usage_for(c), info.tokenizer))

    client = openai.OpenAI(base_url="http://rayinfer.test/v1", api_key="x", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    msg = client.chat.completions.create(model="ds", messages=ASK + [PREFIX], max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].message
    fim = client.completions.create(model="ds", prompt="def f(x):\n", suffix="\n    return y", max_tokens=8,
                                    temperature=0, extra_body={"ignore_eos": True}).choices[0]
    for got, ids in ((msg.content, prompts[0]), (fim.text, prompts[1])):
        want = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        assert got == want.text and len(want.token_ids) == 8
    tok = info.tokenizer
    assert tok.decode(prompts[0], skip_special_tokens=False).endswith("<｜Assistant｜>```python\n")
    assert tok.decode(prompts[1], skip_special_tokens=False).endswith(f"{FIM_HOLE}\n    return y{FIM_END}")


def test_the_checkpoints_choose_their_own_output_parsers(ckpts):
    """What the served model's parsers are chosen from: the template (R1's and V3.1's mention </think>; V3.1 writes
    a call as NAME<｜tool▁sep｜>ARGS) and the tokenizer, in which DeepSeek's added tokens are single tokens."""
    from rayinfer.openai.chat_output import choose_reasoning_parser, tool_format_of

    toks = {t: load_tokenizer(p) for t, p in ckpts.items()}
    assert {t: choose_reasoning_parser(None, k) for t, k in toks.items()} == {"v3": None, "r1": "deepseek_r1",
                                                                            "v31": "deepseek_r1"}
    assert {t: tool_format_of(k) for t, k in toks.items()} == {"v3": "v3", "r1": "v3", "v31": "v3.1"}
    assert len(toks["r1"].encode("<think></think><｜tool▁sep｜>", add_special_tokens=False)) == 3
    calls = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜>" in parse_chat_request(
        {"model": "ds", "messages": ASK + calls + [{"role": "tool", "tool_call_id": "1", "content": "ok"}]},
        _info(ckpts["v31"])).prompts[0][0]


def test_a_runner_emitting_fixed_tokens_reaches_the_client_as_reasoning_content_and_tool_calls(ckpts):
    """End to end on the R1-format checkpoint with a runner that emits a fixed token sequence (the model's own
    tokens for `<think>` … `</think>` and a V3-format call, then EOS): the engine detokenizes it, the front door
    splits it, and the official client reads `reasoning_content`, `content` and a parsed tool call."""
    from rayinfer.openai.chat_output import choose_reasoning_parser, split_message, tool_format_of
    from rayinfer.openai.markers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

    path = ckpts["r1"]
    tok = load_tokenizer(path)
    info = ModelInfo("ds", 4096, 320, tok, reasoning_parser=choose_reasoning_parser(None, tok),
                     tool_format=tool_format_of(tok))
    said = (f"Paris, so ask.</think>\n\nLet me check.{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n"
            f'```json\n{{"city": "Paris"}}\n```{CALL_END}{CALLS_END}')
    llm = LLM(path)
    script = tok.encode(said, add_special_tokens=False) + [min(llm.engine.runner.eos_token_ids)]
    assert len(script) < len(said)  # the markers are single tokens: the runner emits the model's own ids

    def scripted(sched):  # the runner's step: the script's next token for every sequence due one
        return {s.seq.request_id: (script[s.seq.num_tokens - s.seq.num_prompt_tokens], None)
                for s in sched.scheduled if s.samples}

    llm.engine.runner.execute = scripted

    def handler(request):
        spec = parse_chat_request(json.loads(request.content), info)
        o = llm.generate([spec.prompts[0][1]], spec.params, use_tqdm=False)[0]
        c = [ChoiceResult(0, o.token_ids, o.text, None, o.finish_reason, len(o.prompt_token_ids))]
        return httpx2.Response(200, json=chat_response("id", 1, "ds", c, usage_for(c), tok,
                                                       message=lambda text: split_message(text, spec)))

    client = openai.OpenAI(base_url="http://rayinfer.test/v1", api_key="x", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    choice = client.chat.completions.create(model="ds", messages=ASK, tools=[weather], max_tokens=200).choices[0]
    msg = choice.message
    assert choice.finish_reason == "tool_calls" and msg.model_extra["reasoning_content"].strip() == "Paris, so ask."
    assert msg.content.strip() == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
