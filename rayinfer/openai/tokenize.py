"""vLLM's `/tokenize` and `/detokenize`: what clients of the ecosystem use to count and inspect tokens.

Owns those two routes' input and output shapes (vLLM's): `/tokenize` takes a completions-style
`prompt` or a chat-style `messages` list and returns `count`, `max_model_len`, `tokens` and, when
asked, `token_strs`; `/detokenize` takes `tokens` and returns `prompt`. `model` is optional, as
in vLLM, but must name the served model when sent. Crossing it: the decoded JSON body and a
`ModelInfo` in; a JSON-ready dict or an `APIError` out. No Ray, no I/O.
"""
from __future__ import annotations

import jinja2

from rayinfer.openai.errors import APIError, _bad
from rayinfer.openai.limits import _guard_length
from rayinfer.openai.protocol import ModelInfo, _get_bool, _messages, _token_ids, check_model
from rayinfer.openai.responses import token_text

_TOKENIZE = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs",
             "continue_final_message"}


def _only(body: dict, known: set[str], info: ModelInfo) -> None:
    for name in body:
        if name not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
    if body.get("model") is not None:
        check_model(body, info)
    if info.tokenizer is None:
        raise APIError(400, f"Model `{info.name}` has no tokenizer")


def tokenize(body: dict, info: ModelInfo) -> dict:
    _only(body, _TOKENIZE, info)
    tok = info.tokenizer
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise APIError(400, "Send exactly one of 'prompt' (a string) or 'messages' (a chat)", param="prompt")
    if body.get("messages") is not None:
        if _get_bool(body, "continue_final_message"):
            raise _bad("continue_final_message", True, "not supported by this server")
        messages = _messages(body["messages"])
        try:
            text = tok.apply_chat_template(messages, _get_bool(body, "add_generation_prompt", True))
        except jinja2.TemplateError as e:
            raise APIError(400, f"The chat template rejected these messages: {e}", param="messages") from e
        special = _get_bool(body, "add_special_tokens", False)  # the template already wrote BOS
    else:
        text = body["prompt"]
        if not isinstance(text, str):
            raise _bad("prompt", text, "must be a string")
        special = _get_bool(body, "add_special_tokens", True)
    _guard_length(len(text), "prompt", info)
    ids = tok.encode(text, add_special_tokens=special)
    strs = [token_text(tok, t)[0] for t in ids] if _get_bool(body, "return_token_strs") else None
    return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(body: dict, info: ModelInfo) -> dict:
    _only(body, {"model", "tokens"}, info)
    if body.get("tokens") is None:
        raise APIError(400, "Missing required parameter: 'tokens'", param="tokens")
    if not isinstance(body["tokens"], list):
        raise _bad("tokens", body["tokens"], "must be a list of token ids")
    ids = _token_ids(body["tokens"], "tokens", info) if body["tokens"] else []
    return {"prompt": info.tokenizer.decode(ids)}
