"""OpenAI-compatible response shaping: engine results in, plain dicts / SSE bytes out.

Owns the HTTP layer's output contract (no Ray, no I/O): the exact JSON of `text_completion`,
`chat.completion` and their streamed chunks, `usage` (with OpenAI's `cached_tokens` and
DeepSeek's `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`), logprobs in both APIs'
styles, the model list and SSE framing. Crossing it: `ChoiceResult`s (what the ingress assembled
from engine deltas) and per-token `dict[token_id, logprob]`s (the sampled token plus the top-k)
in; JSON-ready dicts out, shaped so the official `openai` client parses them.

Token strings in logprobs: a token's bytes decoded as UTF-8; a piece that is not valid UTF-8 on
its own (half a character) is written `bytes:\\xe2\\x80` as OpenAI does, with the exact bytes in
`bytes`; an id the tokenizer does not know (or any id, without a tokenizer) is `token_id:N`
(vLLM's spelling) with `bytes` null, since it contributes nothing to the text.
"""
from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass

SSE_DONE = b"data: [DONE]\n\n"
_UNLIKELY = -9999.0  # OpenAI's stand-in for a logprob too small to report (JSON has no -inf)


@dataclass(frozen=True)
class PromptView:
    """What a completion choice shows of its prompt: with `echo`, its text before the output (and its tokens in
    the legacy logprobs, with `top` alternatives, when logprobs were asked); with `prompt_logprobs` (vLLM's),
    that many alternatives per prompt token in the choice's own `prompt_logprobs` list."""

    text: str
    token_ids: list[int]
    echo: bool = False
    top: int | None = None  # the request's `logprobs`: None, no logprobs object
    prompt_logprobs: int | None = None


@dataclass
class ChoiceResult:
    """One finished (or, for streaming, in-progress) choice, as the ingress hands it over."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt: PromptView | None = None  # completions asking for echo or prompt_logprobs
    prompt_logprobs: list[dict[int, float] | None] | None = None  # the engine's, one per prompt token (first None)


def _final_reason(reason: str | None, called: bool = False) -> str:
    # "abort" means the client left, so nobody reads it; anything unexpected reads as a normal stop.
    return "length" if reason == "length" else "tool_calls" if called else "stop"


def _chunk_reason(reason: str | None, called: bool = False) -> str | None:
    return None if reason is None else _final_reason(reason, called)


def _lp(x: float) -> float:
    return float(x) if math.isfinite(x) else _UNLIKELY


# ---- usage ----

def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "prompt_cache_hit_tokens": cached_tokens, "prompt_cache_miss_tokens": prompt_tokens - cached_tokens}


def usage_for(choices: list[ChoiceResult], n: int = 1) -> dict:
    """Usage of a whole request: each prompt counts once however many choices it had (OpenAI's
    rule); its cached tokens are the fewest any of its choices found, what one run would have hit."""
    prompts: dict[int, tuple[int, int]] = {}
    for c in choices:
        p = c.index // n
        seen = prompts.get(p)
        cached = c.num_cached_tokens if seen is None else min(seen[1], c.num_cached_tokens)
        prompts[p] = (c.num_prompt_tokens, cached)
    return usage_dict(sum(p for p, _ in prompts.values()), sum(len(c.token_ids) for c in choices),
                      sum(c for _, c in prompts.values()))


# ---- logprobs ----

def token_text(tokenizer, token_id: int) -> tuple[str, list[int] | None]:
    """(display string, UTF-8 bytes or None) of one token, by the rules in the module docstring."""
    if tokenizer is None or tokenizer.id_to_token(token_id) is None:
        return f"token_id:{token_id}", None
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _text_offsets(tokenizer, token_ids: list[int], start: int) -> list[int]:
    # Character offsets into the output text: a token that continues a half-written character
    # points at that character's start; special tokens add nothing (decode skips them).
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    pos, out = start, []
    for t in token_ids:
        out.append(pos)
        if tokenizer is not None and not tokenizer.is_special(t):
            pos += len(dec.decode(tokenizer.token_bytes(t)))
    return out


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                        text_offset: int = 0) -> dict:
    """Legacy completions style. `top_logprobs` holds every entry rayinfer returned (the top k plus
    the sampled token: up to k + 1, as OpenAI documents). `text_offset`: characters of this choice's
    text already sent (streaming) so offsets continue across chunks."""
    tokens, chosen, tops = [], [], []
    for t, lps in zip(token_ids, logprobs):
        tokens.append(token_text(tokenizer, t)[0])
        if lps is None:  # an echoed prompt's first token: nothing predicts it
            chosen.append(None)
            tops.append(None)
            continue
        chosen.append(_lp(lps[t]))
        tops.append({token_text(tokenizer, i)[0]: _lp(v) for i, v in sorted(lps.items(), key=lambda kv: -kv[1])})
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops,
            "text_offset": _text_offsets(tokenizer, token_ids, text_offset)}


def _top(lps: dict[int, float] | None, own: int, k: int) -> dict[int, float] | None:
    """A prompt entry cut to its k best plus the prompt's own token (the engine computed max(k) of a request's asks)."""
    if lps is None:
        return None
    best = dict(sorted(lps.items(), key=lambda kv: -kv[1])[:k])
    best[own] = lps[own]
    return best


def _prompt_entries(view: PromptView, lps, k: int) -> list[dict[int, float] | None]:
    lps = lps if lps is not None else [None] * len(view.token_ids)
    return [_top(e, t, k) for t, e in zip(view.token_ids, lps)]


def vllm_prompt_logprobs(tokenizer, view: PromptView, lps) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token (first None) {token id: {logprob, rank, decoded_token}}; rank is
    1-based among the best entries, None for a prompt token outside them (its rank is not computed)."""
    out = []
    for entry in _prompt_entries(view, lps, view.prompt_logprobs):
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        out.append({str(i): {"logprob": _lp(v), "rank": r + 1 if r < view.prompt_logprobs else None,
                             "decoded_token": token_text(tokenizer, i)[0]} for r, (i, v) in enumerate(ranked)})
    return out


def _echoed(c: ChoiceResult, token_ids, logprobs, text: str, first: bool, sent_chars: int = 0):
    """(text, token ids, logprobs, text offset) of a completion's (part of a) choice, its prompt echoed in front
    on the `first` part."""
    view = c.prompt
    if view is None or not view.echo:
        return text, token_ids, logprobs, sent_chars
    if not first:
        return text, token_ids, logprobs, sent_chars + len(view.text)
    if logprobs is not None:
        token_ids = view.token_ids + token_ids
        logprobs = _prompt_entries(view, c.prompt_logprobs, view.top) + logprobs
    return view.text + text, token_ids, logprobs, 0


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top_logprobs: int) -> dict:
    content = []
    for t, lps in zip(token_ids, logprobs):
        text, raw = token_text(tokenizer, t)
        top = sorted(lps.items(), key=lambda kv: -kv[1])[:top_logprobs]
        alts = [dict(zip(("token", "bytes"), token_text(tokenizer, i)), logprob=_lp(v)) for i, v in top]
        content.append({"token": text, "logprob": _lp(lps[t]), "bytes": raw, "top_logprobs": alts})
    return {"content": content, "refusal": None}


# ---- whole responses ----

def completion_response(id: str, created: int, model: str, choices: list[ChoiceResult], usage: dict,
                        tokenizer=None) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [_completion_choice(c, tokenizer) for c in sorted(choices, key=lambda c: c.index)],
            "usage": usage}


def _completion_choice(c: ChoiceResult, tokenizer, part=None, sent_chars: int = 0) -> dict:
    """A whole choice, or (`part`: this chunk's delta, already folded into `c`) one streamed chunk's choice."""
    first = part is None or len(c.token_ids) == len(part.token_ids)
    text, ids, lps = (c.text, c.token_ids, c.logprobs) if part is None else (part.text, part.token_ids, part.logprobs)
    text, ids, lps, offset = _echoed(c, ids, lps, text, first, sent_chars)
    out = {"index": c.index, "text": text,
           "finish_reason": _final_reason(c.finish_reason) if part is None else _chunk_reason(part.finish_reason),
           "logprobs": None if lps is None else completion_logprobs(tokenizer, ids, lps, offset)}
    if first and c.prompt is not None and c.prompt.prompt_logprobs is not None:
        out["prompt_logprobs"] = vllm_prompt_logprobs(tokenizer, c.prompt, c.prompt_logprobs)
    return out


def completion_delta_chunk(id: str, created: int, model: str, c: ChoiceResult, d, sent_chars: int,
                           tokenizer=None) -> dict:
    """The streamed chunk of delta `d` of choice `c` (`d` folded into it already; `sent_chars` of its output text
    sent before `d`): the echoed prompt and vLLM's prompt_logprobs ride on the choice's first chunk."""
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [_completion_choice(c, tokenizer, d, sent_chars)]}


def chat_response(id: str, created: int, model: str, choices: list[ChoiceResult], usage: dict,
                  tokenizer=None, top_logprobs: int = 0, message=None) -> dict:
    """`message`: text -> (the assistant message, whether the model chose to call tools: finish reason
    "tool_calls"); rayinfer.openai.chat_output splits out the reasoning and the calls."""
    message = message or (lambda text: ({"role": "assistant", "content": text}, False))
    out = {"id": id, "object": "chat.completion", "created": created, "model": model,
           "choices": [{"index": c.index, "message": (m := message(c.text))[0],
                        "finish_reason": _final_reason(c.finish_reason, m[1]),
                        "logprobs": None if c.logprobs is None else
                        chat_logprobs(tokenizer, c.token_ids, c.logprobs, top_logprobs)}
                       for c in sorted(choices, key=lambda c: c.index)],
           "usage": usage}
    first = min(choices, key=lambda c: c.index, default=None)  # a chat request has one prompt
    if first is not None and first.prompt is not None and first.prompt.prompt_logprobs is not None:
        out["prompt_logprobs"] = vllm_prompt_logprobs(tokenizer, first.prompt, first.prompt_logprobs)  # vLLM's place
    return out


# ---- streaming ----

def completion_chunk(id: str, created: int, model: str, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None, usage: dict | None = None) -> dict:
    """`logprobs`: this chunk's tokens, already shaped by `completion_logprobs`."""
    out = {"id": id, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": index, "text": text, "finish_reason": _chunk_reason(finish_reason),
                        "logprobs": logprobs}]}
    if usage is not None:
        out["usage"] = usage
    return out


def chat_chunk(id: str, created: int, model: str, index: int, delta_text: str | None, finish_reason: str | None,
               role: str | None = None, logprobs: dict | None = None, reasoning: str | None = None,
               tool_calls: list[dict] | None = None, called: bool = False) -> dict:
    """`role` on a choice's first chunk (OpenAI sends role + empty content first); `logprobs`:
    this chunk's tokens, already shaped by `chat_logprobs`; `reasoning`: a `reasoning_content` delta;
    `tool_calls`: OpenAI tool-call deltas; `called`: the choice made tool calls (its finish reason says so)."""
    delta = {"role": role, "content": delta_text or ""} if role else ({"content": delta_text} if delta_text else {})
    if reasoning:
        delta["reasoning_content"] = reasoning
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": _chunk_reason(finish_reason, called),
                         "logprobs": logprobs}]}


def usage_chunk(kind: str, id: str, created: int, model: str, usage: dict) -> dict:
    """The extra last chunk `stream_options.include_usage` asks for: no choices, the request's usage."""
    obj = {"chat": "chat.completion.chunk", "completion": "text_completion"}[kind]
    return {"id": id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


def models_response(infos) -> dict:
    """`/v1/models` for the served `ModelInfo`s."""
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                        "owned_by": "rayinfer", "max_model_len": m.max_model_len} for m in infos]}
