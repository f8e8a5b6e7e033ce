"""OpenAI-compatible request parsing: JSON bodies in, validated `RequestSpec`s or `APIError`s out.

Owns the HTTP layer's input contract and nothing else (no Ray, no I/O): what `/v1/completions`
and `/v1/chat/completions` accept (vLLM's sampling extensions included), the chat template,
tokenization and the mapping onto `SamplingParams`; the length limits are `rayinfer.openai.limits`'. Crossing it: the decoded JSON body and a `ModelInfo` in; a
`RequestSpec` (token-id prompts + `SamplingParams` + rendering options) out, or an `APIError`
whose `status` and `to_dict()` are the HTTP response. Response shaping lives in
`rayinfer.openai.responses` (re-exported here so the ingress has one import), the error object in
`rayinfer.openai.errors`.

Every mistake a client can make is a 400 naming the parameter and the bad value (an unknown
model is a 404). Parameters sent as JSON null count as absent, since many clients send them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jinja2

from rayinfer.messages import SamplingParams
from rayinfer.openai.chat_output import starts_in_reasoning
from rayinfer.openai.continuation import cut_after_prefix, fim_prompts, prefix_message
from rayinfer.openai.errors import APIError, _bad, _show  # noqa: F401 - APIError is used and re-exported
from rayinfer.openai.limits import (RequestLimits, _guard_length, _max_tokens, check_logit_bias, check_prompt_count,
                                    check_prompt_logprob_tokens, check_stops, check_token_ids)
from rayinfer.openai.responses import (SSE_DONE, ChoiceResult, PromptView, chat_chunk, chat_logprobs,  # noqa: F401
                                       chat_response, completion_chunk, completion_delta_chunk, completion_logprobs,
                                       completion_response, models_response, sse, usage_chunk,
                                       usage_dict, usage_for)
from rayinfer.openai.structured import parse_structured
from rayinfer.openai.tool_request import parse_tools
from rayinfer.tokenizer import Tokenizer

@dataclass(frozen=True)
class ModelInfo:
    name: str  # the served model id clients must send as `model`
    max_model_len: int
    vocab_size: int  # the model's (embedding) vocabulary: token-id prompts must lie in [0, vocab_size)
    tokenizer: Tokenizer | None = None
    created: int = 0
    kv_capacity_tokens: int = 0  # what the serving ranks' KV cache holds for one request; 0: not known
    max_token_chars: int = 0  # the longest token's length in characters; 0: no length guard before tokenizing
    limits: RequestLimits = RequestLimits()  # list sizes one request may send
    reasoning_parser: str | None = None  # rayinfer.openai.chat_output.choose_reasoning_parser's choice
    tool_format: str = "v3"  # DeepSeek's tool-call format in its output (rayinfer.openai.chat_output.tool_format_of)


@dataclass
class RequestSpec:
    """A validated request. Choice `i` of prompt `p` has OpenAI index `p * n + i`."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[tuple[str | None, list[int]]]  # (text or None for token-id prompts, token ids)
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | bool | None = None  # completions: top-k count or None; chat: bool
    top_logprobs: int = 0  # chat only
    reasoning: bool | None = None  # chat: None without a reasoning parser, else whether the output starts reasoning
    tool_format: str | None = None  # chat: the tool-call format its output is parsed for (None: not parsed)
    forced_tool: str | None = None  # chat: tool_choice named this function, so the whole output is its arguments
    tools_required: bool = False  # chat: tool_choice "required", so the whole output is a JSON list of calls
    echo: bool = False  # completions: the prompt's text (and, with logprobs, its tokens) before the output
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: that many alternatives per prompt token

    def choice(self, index: int) -> ChoiceResult:
        """Choice `index` before any delta: it collects logprobs when asked, and knows what it shows of its prompt."""
        text, ids = self.prompts[index // self.n]
        view = PromptView(text or "", ids, self.echo, self.logprobs, self.prompt_logprobs) \
            if self.echo or self.prompt_logprobs is not None else None
        return ChoiceResult(index=index, token_ids=[], text="",
                            logprobs=[] if self.params.logprobs is not None else None, prompt=view)


_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
           "frequency_penalty", "n", "stop", "seed", "stream", "stream_options", "ignore_eos", "logit_bias",
           # vLLM's extensions, which its benchmark and many ecosystem clients send
           "repetition_penalty", "min_tokens", "stop_token_ids", "skip_special_tokens",
           "spaces_between_special_tokens", "include_stop_str_in_output", "structured_outputs"}
_FIELDS = {"completion": _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix", "prompt_logprobs"},
           "chat": _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                              "tool_choice", "functions", "function_call", "response_format", "chat_template_kwargs",
                              "prompt_logprobs"}}
# Accepted only at values that ask for nothing beyond plain text generation.
_HARMLESS = {"best_of": lambda v: v == 1 and not isinstance(v, bool),
             "functions": lambda v: v == [],
             "function_call": lambda v: v == "none",
             # output shaping rayinfer always does one way: special tokens skipped, stop strings cut off
             "skip_special_tokens": lambda v: v is True, "spaces_between_special_tokens": lambda v: v is True,
             "include_stop_str_in_output": lambda v: v is False}
_ROLES = ("system", "user", "assistant", "tool")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _get_int(body: dict, name: str, lo: int, hi: int | None, default=None, param: str | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise _bad(param or name, v, f"must be an integer in [{lo}, {hi}]" if hi is not None
                   else f"must be an integer >= {lo}")
    return v


def _get_num(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v > hi or v < lo \
            or (lo_open and v == lo):
        raise _bad(name, v, f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(v)


def _get_bool(body: dict, name: str, default: bool = False, param: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(param or name, v, "must be true or false")
    return v


def check_model(body, info: ModelInfo) -> None:
    model = body.get("model")
    if model is None:
        raise APIError(400, "Missing required parameter: 'model'", param="model")
    if not isinstance(model, str):
        raise _bad("model", model, "must be a string")
    if model != info.name:
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it "
                            f"(this server serves `{info.name}`)", param="model", code="model_not_found")


def _check_envelope(body, kind: str, info: ModelInfo) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}: {_show(body)}")
    for name, value in body.items():
        if name in _IGNORED or (name == "stream_options" and value is None):
            continue
        if name not in _FIELDS[kind]:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
        if name in _HARMLESS and value is not None and not _HARMLESS[name](value):
            raise APIError(400, f"'{name}'={_show(value)} is not supported by this server", param=name)
    check_model(body, info)
    return body


def _sampling(body: dict, max_tokens: int, logprobs: int | None, info: ModelInfo,
              structured: tuple[str, str] | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop", stop, "must be a non-empty string or a list of non-empty strings")
        stop = tuple(stops)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not isinstance(stop_ids, list):
        raise _bad("stop_token_ids", stop_ids, "must be a list of token ids")
    check_stops(list(stop or ()), stop_ids or [], info)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise _bad("top_k", top_k, "must be an integer >= 1, or 0 / -1 to disable")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=_get_num(body, "temperature", 0, 2, 1.0),
            top_p=_get_num(body, "top_p", 0, 1, 1.0, lo_open=True), top_k=top_k or 0,
            min_p=_get_num(body, "min_p", 0, 1, 0.0),
            presence_penalty=_get_num(body, "presence_penalty", -2, 2, 0.0),
            frequency_penalty=_get_num(body, "frequency_penalty", -2, 2, 0.0), stop=stop or (),
            stop_token_ids=tuple(stop_ids or ()), ignore_eos=_get_bool(body, "ignore_eos"),
            seed=_get_int(body, "seed", *_INT64), logprobs=logprobs,
            repetition_penalty=_get_num(body, "repetition_penalty", 0, 100, 1.0, lo_open=True),
            min_tokens=_get_int(body, "min_tokens", 0, max_tokens, default=0),
            logit_bias=check_logit_bias(body["logit_bias"], info) if body.get("logit_bias") is not None else (),
            structured=structured or parse_structured(body), prompt_logprobs=prompt_logprobs)
    except ValueError as e:  # a constraint SamplingParams knows and this layer does not
        name = str(e).split("=", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, f"Invalid request: {e}", param=name) from e


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _get_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", opts, "only allowed when 'stream' is true")
    if not isinstance(opts, dict):
        raise _bad("stream_options", opts, 'must be an object like {"include_usage": true}')
    for key in opts:
        if key not in ("include_usage", "include_obfuscation"):  # obfuscation: nothing to obfuscate here
            raise _bad(f"stream_options.{key}", opts[key], "unknown stream option")
    _get_bool(opts, "include_obfuscation", param="stream_options.include_obfuscation")
    return stream, _get_bool(opts, "include_usage", param="stream_options.include_usage")


def _token_ids(ids: list, param: str, info: ModelInfo) -> list[int]:
    if not ids:
        raise _bad(param, ids, "the prompt is empty")
    check_token_ids(ids, param, info.vocab_size)
    return list(ids)


def _completion_prompts(prompt, info: ModelInfo, n: int) -> list[tuple[str | None, list[int]]]:
    if prompt is None:
        raise APIError(400, "Missing required parameter: 'prompt'", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompt = [prompt]
    shape = "must be a string, a list of strings, a list of token ids, or a list of token-id lists"
    if not isinstance(prompt, list) or not prompt:
        raise _bad("prompt", prompt, "the prompt is empty" if prompt == [] else shape)
    check_prompt_count(len(prompt), n, info.limits)  # before tokenizing any of them
    out = []
    for i, p in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise _bad(param, p, "the prompt is empty")
            if info.tokenizer is None:
                raise _bad(param, p, "this model has no tokenizer: send the prompt as a list of token ids")
            _guard_length(len(p), param, info)
            out.append((p, info.tokenizer.encode(p)))
        elif isinstance(p, list):
            out.append((None, _token_ids(p, param, info)))
        else:
            raise _bad(param, p, shape)
    return out


def parse_completion_request(body, info: ModelInfo) -> RequestSpec:
    body = _check_envelope(body, "completion", info)
    n = _get_int(body, "n", 1, 16, default=1)
    echo, prompt, suffix = _get_bool(body, "echo"), body.get("prompt"), body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _bad("suffix", suffix, "must be a string")
    if suffix and prompt is not None:  # DeepSeek's FIM completion: the model writes what goes between
        if echo:
            raise _bad("echo", echo, "cannot be combined with 'suffix'")
        prompt = fim_prompts(prompt, suffix, info.tokenizer)
    prompts = _completion_prompts(prompt, info, n)
    # OpenAI's default for completions; 0 with echo returns the prompt alone (how evaluation harnesses score text)
    requested = _get_int(body, "max_tokens", 0 if echo else 1, None, default=16)
    for _, ids in prompts:
        _max_tokens(requested, len(ids), info, "prompt")
    logprobs = _get_int(body, "logprobs", 0, 5)
    asked = _get_int(body, "prompt_logprobs", 0, 20)
    # the engine computes one list per prompt, as wide as the widest of the two asks
    wide = max((k for k in (asked, logprobs if echo else None) if k is not None), default=None)
    if wide is not None:
        check_prompt_logprob_tokens([len(ids) for _, ids in prompts], n, "echo" if asked is None else "prompt_logprobs",
                                    info.limits)
    if echo:  # the echoed text of a token-id prompt is its decoding
        prompts = [(text if text is not None else info.tokenizer.decode(ids) if info.tokenizer else "", ids)
                   for text, ids in prompts]
    stream, include_usage = _stream_flags(body)
    return RequestSpec("completion", info.name, prompts,
                       _sampling(body, requested, logprobs, info, prompt_logprobs=wide),
                       n=n, stream=stream, include_usage=include_usage,
                       logprobs=logprobs, echo=echo, prompt_logprobs=asked)


def _history_calls(calls, at: str) -> list[dict] | None:
    """An assistant turn's `tool_calls`, as the chat template reads them back."""
    if calls in (None, []):
        return None
    shape = 'each must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": "<JSON>"}}'
    if not isinstance(calls, list):
        raise _bad(f"{at}.tool_calls", calls, shape)
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise _bad(f"{at}.tool_calls[{j}]", c, shape)
    return [{"id": c.get("id"), "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}} for c in calls]


def _text_chars(m: dict) -> int:
    content = m["content"]
    chars = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
    return chars + sum(len(c["function"]["name"]) + len(c["function"]["arguments"]) for c in m.get("tool_calls", ()))


def _messages(messages) -> list[dict]:
    if messages is None:
        raise APIError(400, "Missing required parameter: 'messages'", param="messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", messages, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(at, m, 'each message must be an object like {"role": "user", "content": "..."}')
        if m.get("role") not in _ROLES:
            raise _bad(f"{at}.role", m.get("role"), f"must be one of {', '.join(_ROLES)}")
        content = m.get("content")
        calls = _history_calls(m.get("tool_calls"), at) if m["role"] == "assistant" else None
        if content is None and calls:
            content = ""  # an assistant turn that only called tools
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{at}.content[{j}]", part, 'only {"type": "text", "text": "..."} parts are supported')
        elif not isinstance(content, str):
            raise _bad(f"{at}.content", content, "must be a string or a list of text parts")
        for key, value in m.items():
            # Clients echo assistant messages back with null fields (refusal, tool_calls, audio...); a previous
            # turn's reasoning_content is dropped, as DeepSeek documents (never sent back into the prompt).
            if key not in ("role", "content", "name", "reasoning_content", "tool_calls", "tool_call_id", "prefix") \
                    and value not in (None, []):
                raise _bad(f"{at}.{key}", value, "not supported by this server")
        msg = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = calls
        if m["role"] == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise _bad(f"{at}.tool_call_id", m.get("tool_call_id"), "a tool message must name its tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


_MAX_TEMPLATE_KWARGS = 16


def _template_kwargs(kw) -> dict | None:
    """chat_template_kwargs (how DeepSeek-V3.1's thinking mode is switched: {"thinking": true}): a few named
    scalars; the template's own variables (messages, tools, special tokens...) cannot be replaced."""
    if kw is None:
        return None
    if not isinstance(kw, dict) or len(kw) > _MAX_TEMPLATE_KWARGS:
        raise _bad("chat_template_kwargs", kw, f"must be an object of at most {_MAX_TEMPLATE_KWARGS} variables")
    for key, value in kw.items():
        if not key.isidentifier() or len(key) > 64:
            raise _bad("chat_template_kwargs", key, "variable names must be identifiers")
        if not (value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 1024)):
            raise _bad(f"chat_template_kwargs.{key}", value, "must be a boolean, number or short string")
    return kw


def parse_chat_request(body, info: ModelInfo) -> RequestSpec:
    body = _check_envelope(body, "chat", info)
    n = _get_int(body, "n", 1, 16, default=1)
    check_prompt_count(1, n, info.limits)
    messages = _messages(body.get("messages"))
    prefix = prefix_message(body["messages"])  # DeepSeek's chat prefix completion: continue the last message
    if info.tokenizer is None:
        raise APIError(400, f"Model `{info.name}` has no tokenizer or chat template: use /v1/completions "
                            "with token-id prompts", param="messages")
    _guard_length(sum(map(_text_chars, messages)), "messages", info)
    use = parse_tools(body, info.limits)
    try:
        text = info.tokenizer.apply_chat_template(messages, add_generation_prompt=prefix is None, tools=use.tools,
                                                  extra=_template_kwargs(body.get("chat_template_kwargs")))
        if prefix is not None:
            text = cut_after_prefix(text, messages[prefix]["content"])
    except (jinja2.TemplateError, TypeError) as e:  # TypeError: a template adding None (a field it did not expect)
        raise APIError(400, f"The chat template rejected these messages: {e}", param="messages") from e
    ids = info.tokenizer.encode(text, add_special_tokens=False)  # the template already wrote BOS
    newer, legacy = _get_int(body, "max_completion_tokens", 1, None), _get_int(body, "max_tokens", 1, None)
    requested = newer if newer is not None else legacy
    max_tokens = _max_tokens(requested, len(ids), info, "messages")
    logprobs = _get_bool(body, "logprobs")
    top = _get_int(body, "top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise _bad("top_logprobs", top, "requires 'logprobs' to be true")
    stream, include_usage = _stream_flags(body)
    asked = _get_int(body, "prompt_logprobs", 0, 20)
    if asked is not None:  # vLLM's: in the response, beside the choices (a stream has no place for them)
        if stream:
            raise _bad("prompt_logprobs", asked, "not available when 'stream' is true")
        check_prompt_logprob_tokens([len(ids)], n, "prompt_logprobs", info.limits)
    return RequestSpec("chat", info.name, [(text, ids)],
                       _sampling(body, max_tokens, (top or 0) if logprobs else None, info, use.constraint,
                                 prompt_logprobs=asked), n=n,
                       stream=stream, prompt_logprobs=asked,
                       include_usage=include_usage, logprobs=logprobs, top_logprobs=top or 0,
                       reasoning=None if info.reasoning_parser is None or use.constraint else starts_in_reasoning(text),
                       tool_format=info.tool_format if use.parse else None, forced_tool=use.forced,
                       tools_required=use.required)
