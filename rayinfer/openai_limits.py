"""How long a request may be: the model's context, the serving ranks' KV cache, and a guard on text
length before any tokenizing.

Owns the 400s (`context_length_exceeded`) for prompts and completions that cannot fit, and the
default `max_tokens` when a chat request sends none: what both the context and the ranks' cache
leave for it. Crossing it: token counts and a `ModelInfo` in; a `max_tokens` or an `APIError` out.
"""
from __future__ import annotations

from rayinfer.openai_errors import APIError


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
