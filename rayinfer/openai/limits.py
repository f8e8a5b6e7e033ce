"""How much a request may ask for: the model's context, the serving ranks' KV cache, a guard on text
length before any tokenizing, and the sizes of its lists (`RequestLimits`).

Owns the 400s (`context_length_exceeded`) for prompts and completions that cannot fit, the default
`max_tokens` when a chat request sends none (what both the context and the ranks' cache leave for it),
the bounds on how many prompts, choices (n x prompts), stop strings, stop token ids and prompt-logprob tokens one
request carries, and the vocabulary check every client-sent token id passes (prompt ids, `stop_token_ids`,
`logit_bias` keys), so that nothing a rank would index with is out of range. Crossing it: token counts,
lists and a `ModelInfo` in; a `max_tokens` or an `APIError` out.
"""
from __future__ import annotations

from dataclasses import dataclass

from rayinfer.openai.errors import APIError, _bad


@dataclass(frozen=True)
class RequestLimits:
    """Per-request list bounds (ServeConfig's fields of the same names set them). Each is checked before the
    work it bounds (prompts are counted before any is tokenized), so an oversized body is refused in
    proportion to its bytes, not to what it asks for."""

    max_prompts_per_request: int = 256
    max_choices_per_request: int = 256  # n x prompts: what one request adds to the queue
    max_stop_strings: int = 4  # OpenAI's bound
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300  # OpenAI's bound
    max_tools: int = 128  # OpenAI's bound
    # prompt tokens x choices whose logprobs one request returns (echo with logprobs, prompt_logprobs): each is a
    # JSON entry of up to 21 alternatives, so this bounds the response a small body can ask for (~0.3 GB at 2**17)
    max_prompt_logprob_tokens: int = 2**17


def _check_count(count: int, bound: int, param: str, what: str, field: str) -> None:
    if count > bound:
        raise APIError(400, f"Invalid value for '{param}': {count} {what}; this server takes at most {bound} in "
                            f"one request ({field} in the serve config)", param=param)


def check_prompt_count(count: int, n: int, limits: RequestLimits) -> None:
    """Prompts per request and n x prompts (the choices one request queues), before any prompt is tokenized."""
    _check_count(count, limits.max_prompts_per_request, "prompt", "prompts", "max_prompts_per_request")
    if count * n > limits.max_choices_per_request:
        raise APIError(400, f"Invalid value for 'n': {n} choices for each of {count} prompts make {count * n} "
                            f"choices; this server takes at most {limits.max_choices_per_request} in one request "
                            f"(max_choices_per_request in the serve config)",
                       param="n")


def check_prompt_logprob_tokens(prompt_lens: list[int], n: int, param: str, limits: RequestLimits) -> None:
    """The prompt tokens whose logprobs a request returns, over all its choices."""
    _check_count(n * sum(prompt_lens), limits.max_prompt_logprob_tokens, param,
                 "prompt tokens (x n) to return logprobs for", "max_prompt_logprob_tokens")


def check_token_ids(ids, param: str, vocab_size: int) -> None:
    """Every id an integer in [0, vocab_size): a rank indexes its embeddings and logits with them."""
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise _bad(param, t, f"token ids must be integers in [0, {vocab_size})")


def check_stops(stops: list, stop_ids: list, info: ModelInfo) -> None:
    """Stop strings and stop token ids: bounded lists; the ids inside the vocabulary."""
    lim = info.limits
    _check_count(len(stops), lim.max_stop_strings, "stop", "stop strings", "max_stop_strings")
    _check_count(len(stop_ids), lim.max_stop_token_ids, "stop_token_ids", "stop token ids", "max_stop_token_ids")
    check_token_ids(stop_ids, "stop_token_ids", info.vocab_size)


def check_logit_bias(bias, info: ModelInfo) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id": bias}): at most max_logit_bias entries, ids in the vocabulary, biases
    in [-100, 100]."""
    if not isinstance(bias, dict):
        raise _bad("logit_bias", bias, 'must be an object mapping token ids to biases, like {"50256": -100}')
    _check_count(len(bias), info.limits.max_logit_bias, "logit_bias", "entries", "max_logit_bias")
    pairs = []
    for key, value in bias.items():
        tid = int(key) if isinstance(key, str) and key.isdigit() and len(key) < 12 else None
        if tid is None or tid >= info.vocab_size:
            raise _bad(f"logit_bias.{key}", value, f"keys must be token ids in [0, {info.vocab_size})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -100 <= value <= 100:
            raise _bad(f"logit_bias.{key}", value, "biases must be numbers in [-100, 100]")
        pairs.append((tid, float(value)))
    return tuple(sorted(pairs))


def _max_tokens(requested: int | None, prompt_len: int, info: ModelInfo, where: str) -> int:
    limit = info.max_model_len
    if requested is None:  # chat's default: whatever the context and the ranks' KV cache leave
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {where} "
                                f"resulted in {prompt_len} tokens. Please reduce the length of the {where}.",
                           param=where, code="context_length_exceeded")
        requested = limit - prompt_len
        if info.kv_capacity_tokens:
            _fits_cache(prompt_len + 1, prompt_len, info, where)
            requested = min(requested, info.kv_capacity_tokens - prompt_len)
        return requested
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the {where}, {requested} for the "
                            f"completion). Please reduce the length of the {where} or completion.",
                       param=where, code="context_length_exceeded")
    _fits_cache(prompt_len + requested, prompt_len, info, where)
    return requested


def _fits_cache(total: int, prompt_len: int, info: ModelInfo, where: str) -> None:
    cap = info.kv_capacity_tokens
    if cap and total > cap:  # no rank could ever admit it: say so now rather than fail on a rank
        raise APIError(400, f"This server's ranks hold at most {cap} tokens of KV cache per request. However, "
                            f"you requested {total} tokens ({prompt_len} in the {where}, {total - prompt_len} "
                            f"for the completion). Please reduce the length of the {where} or max_tokens.",
                       param=where, code="context_length_exceeded")


def _guard_length(chars: int, param: str, info: ModelInfo) -> None:
    """Refuses, before tokenizing, text too long to fit the context even if every token were the longest."""
    if info.max_token_chars and chars > info.max_model_len * info.max_token_chars:
        raise APIError(400, f"This model's maximum context length is {info.max_model_len} tokens. However, your "
                            f"{param} has {chars} characters, more than that many tokens can hold.",
                       param=param, code="context_length_exceeded")


class Admission:
    """What one ingress replica holds: requests in flight, their choices (n x prompts) and those choices'
    tokens (prompt + max_tokens each). A request that would take either count past its bound waits
    nowhere: 429 now (it fits once others finish), or 400 when it could never fit an empty queue."""

    def __init__(self, max_choices: int, max_tokens: int):
        self.max_choices, self.max_tokens = max_choices, max_tokens
        self.requests = self.choices = self.tokens = 0
        self.parsing = 0  # bodies being read and tokenized: not admitted yet, but the server is busy with them

    def admit(self, choices: int, tokens: int) -> tuple[int, int]:
        """Counts a request in, or raises; -> the ticket `release` takes back."""
        for held, want, bound, name in ((self.choices, choices, self.max_choices, "choices"),
                                        (self.tokens, tokens, self.max_tokens, "tokens")):
            field = "max_queue" if name == "choices" else "max_queue_tokens"
            if want > bound:
                raise APIError(400, f"This request asks for {want} {name} (n x prompts, each prompt + max_tokens), "
                                    f"more than this server ever holds at once ({bound}; {field} in the serve "
                                    f"config). Please send fewer prompts, a smaller n or max_tokens.")
            if held + want > bound:
                raise APIError(429, f"server is at its queue bound ({held} of {bound} {name} in flight; this request "
                                    f"needs {want}); retry shortly")
        self.requests, self.choices, self.tokens = self.requests + 1, self.choices + choices, self.tokens + tokens
        return choices, tokens

    def release(self, ticket: tuple[int, int]) -> None:
        self.requests -= 1
        self.choices -= ticket[0]
        self.tokens -= ticket[1]

    def snapshot(self) -> dict:
        return {"inflight": self.requests, "queued_choices": self.choices, "queued_tokens": self.tokens,
                "parsing": self.parsing}
