"""What a row means to the engine stage, and what the stage writes back: pure, no Ray.

A row reaching the engine stage carries its prompt one of three ways: `prompt` (text), `prompt_token_ids`,
or `messages` (a chat, rendered with the model's chat template), and optionally `sampling_params` (a dict
of `SamplingParams` fields over the processor's defaults). The preprocess wrapper (`encode_row`) turns
the nested values into JSON strings so rows of any shape make one Arrow schema; `plan_row` reads them
back into the choices to run. A row may instead be one request of an OpenAI batch file (`openai_url`
and the raw `openai_line`): it is parsed by the HTTP server's own validators (rayinfer.openai.protocol)
and answered with the HTTP server's own response body (rayinfer.openai.responses).

Crossing it: row dicts in; `Plan`s (token-id prompts + params per choice, or an `APIError`) out to the
worker, and the worker's `ChoiceResult`s in; the result columns (`RESULT_TYPES`) out.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from rayinfer.messages import SamplingParams
from rayinfer.openai.protocol import (APIError, ChoiceResult, ModelInfo, chat_response, completion_response,
                                      parse_chat_request, parse_completion_request, usage_for)

SAMPLING, MESSAGES = "__sampling_params", "__messages"  # the JSON-encoded forms of the nested row values
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def result_types():
    """Columns the engine stage adds to every row, with their Arrow types."""
    import pyarrow as pa

    return {"generated_text": pa.string(), "generated_token_ids": pa.list_(pa.int64()),
            "finish_reason": pa.string(), "num_prompt_tokens": pa.int64(), "num_generated_tokens": pa.int64(),
            "num_cached_tokens": pa.int64(), "attempts": pa.int64(), "error": pa.string(),
            "status_code": pa.int64(), "response_body": pa.string(),
            "started_at": pa.float64(), "finished_at": pa.float64()}  # wall clock: when the engine got / ended it


def encode_row(row: dict) -> dict:
    """A preprocessed row as the engine stage reads it: nested values as JSON strings."""
    row = dict(row)
    for key, col in (("sampling_params", SAMPLING), ("messages", MESSAGES)):
        if key in row:
            row[col] = json.dumps(row.pop(key), default=_plain)
    return row


def _plain(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars, as Ray Data may hand nested values over
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def decode_row(row: dict) -> dict:
    """The inverse of `encode_row`, for the postprocess function: it sees what its preprocess wrote."""
    row = dict(row)
    for key, col in (("sampling_params", SAMPLING), ("messages", MESSAGES)):
        if col in row:
            value = row.pop(col)
            row[key] = json.loads(value) if value is not None else None
    return row


@dataclass
class Plan:
    """The choices one row runs: `prompts[i // n]` with its own seed per `i % n`, or the error it is."""

    prompts: list[list[int]] = field(default_factory=list)
    params: SamplingParams | None = None
    n: int = 1
    spec: object = None  # the parsed OpenAI request, for rows of a batch file
    error: APIError | None = None


def plan_row(row: dict, info: ModelInfo, defaults: dict) -> Plan:
    try:
        if row.get("openai_url") is not None:
            return _openai_plan(row, info)
        return Plan([_prompt_ids(row, info)], _params(row.get(SAMPLING), defaults))
    except APIError as e:
        return Plan(error=e)
    except Exception as e:  # noqa: BLE001 - a malformed row (a chat template refusing it, ...) fails alone
        return Plan(error=APIError(400, f"invalid row: {type(e).__name__}: {e}"))


def _openai_plan(row: dict, info: ModelInfo) -> Plan:
    body = json.loads(row["openai_line"])["body"]  # the envelope was checked when the line was read
    parse = parse_chat_request if ENDPOINTS[row["openai_url"]] == "chat" else parse_completion_request
    spec = parse(body, info)
    return Plan([ids for _, ids in spec.prompts], spec.params, spec.n, spec)


def _prompt_ids(row: dict, info: ModelInfo) -> list[int]:
    given = [k for k in ("prompt", "prompt_token_ids", MESSAGES) if row.get(k) is not None]
    if len(given) != 1:
        raise APIError(400, "a row needs exactly one of 'prompt', 'prompt_token_ids' or 'messages', got "
                            f"{[k.strip('_') for k in given] or 'none'}")
    if given[0] == "prompt_token_ids":
        ids = list(row["prompt_token_ids"])
        if not ids or not all(isinstance(t, int) and 0 <= t < info.vocab_size for t in ids):
            raise APIError(400, f"prompt_token_ids must be a non-empty list of integers in [0, {info.vocab_size})",
                           param="prompt_token_ids")
        return ids
    tok = info.tokenizer
    if tok is None:
        raise APIError(400, f"model {info.name} has no tokenizer: give rows 'prompt_token_ids'")
    if given[0] == "prompt":
        return tok.encode(row["prompt"])
    text = tok.apply_chat_template(json.loads(row[MESSAGES]), add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)  # the template already wrote BOS


def _params(encoded: str | None, defaults: dict) -> SamplingParams:
    own = json.loads(encoded) if encoded else {}
    if not isinstance(own, dict):
        raise APIError(400, f"sampling_params must be a dict, got {own!r}", param="sampling_params")
    try:
        return SamplingParams(**{**defaults, **{k: v for k, v in own.items() if v is not None}})
    except (TypeError, ValueError) as e:
        raise APIError(400, f"Invalid sampling_params: {e}", param="sampling_params") from e


def result_columns(row: dict, plan: Plan, choices: list[ChoiceResult], attempts: int, info: ModelInfo,
                   error: APIError | None = None, started_at: float | None = None) -> dict:
    """The engine stage's columns for one row (see `result_types`)."""
    out = dict.fromkeys(result_types())
    out.update(attempts=attempts, started_at=started_at, finished_at=time.time())
    error = error or plan.error
    if error is not None:
        out.update(error=error.message, status_code=error.status, response_body=json.dumps(error.to_dict()))
        return out
    first = choices[0]
    out.update(generated_text=first.text, generated_token_ids=first.token_ids, finish_reason=first.finish_reason,
               num_prompt_tokens=first.num_prompt_tokens, num_generated_tokens=len(first.token_ids),
               num_cached_tokens=first.num_cached_tokens, status_code=200)
    if plan.spec is not None:
        spec, usage, now = plan.spec, usage_for(choices, plan.n), int(time.time())
        rid = ("chatcmpl-" if spec.kind == "chat" else "cmpl-") + row.get("custom_id", "")
        body = chat_response(rid, now, info.name, choices, usage, info.tokenizer, spec.top_logprobs) \
            if spec.kind == "chat" else completion_response(rid, now, info.name, choices, usage, info.tokenizer)
        out["response_body"] = json.dumps(body, ensure_ascii=False)
    return out
