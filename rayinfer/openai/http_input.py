"""Untrusted HTTP input before any parsing of its meaning: bytes in, a JSON object or an `APIError` out.

Owns the checks every request body and header passes before `rayinfer.openai.protocol` reads it:
the body-size bound (enforced while the bytes arrive, so a 10 MB body costs one chunk past the
limit, not 10 MB), JSON that is well-formed, nested no deeper than `MAX_JSON_DEPTH`, free of
lone surrogates (which no tokenizer can encode) and an object at the top; the API-key check
(constant time, the key never appears in a message); and turning a rank's exception into one
readable line for a client. No Ray, no FastAPI: plain values and async iterators cross it.
"""
from __future__ import annotations

import hmac
import json
import re

from rayinfer.openai.errors import APIError

MAX_JSON_DEPTH = 64  # deeper than any OpenAI request needs
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Ray's "(pid=123, ip=...)" tags, actor/task ids and object reprs: noise to a client, sometimes internal detail.
_NOISE = re.compile(r"\((?:pid|ip)=[^)]*\)|(?:actor_id|Actor ID|task_id|worker_id)[=:]\s*[0-9a-f]+,?"
                    r"|<[\w.]+ object at 0x[0-9a-f]+>")


async def read_body(chunks, limit: int, content_length: str | None = None) -> bytes:
    """The whole body from an async iterator of byte chunks, refusing (413) once it passes `limit`."""
    too_big = APIError(413, f"The request body exceeds this server's limit of {limit} bytes "
                            "(max_request_bytes in the serve config)", type="invalid_request_error")
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise too_big
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def _check_value(value, path: str, depth: int = 1) -> None:
    """Nesting within `MAX_JSON_DEPTH`, and every string (keys too) encodable: JSON's \\ud800 escapes
    decode to lone surrogates, which no tokenizer takes. The walk stops at the bound, so it never recurses deep."""
    if depth > MAX_JSON_DEPTH and isinstance(value, (dict, list)):
        raise APIError(400, f"the request body is not valid JSON for this server: nested deeper than "
                            f"{MAX_JSON_DEPTH} levels", param=path or None)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"Invalid value for '{path}': the text holds a lone UTF-16 surrogate "
                                f"({value[e.start]!a} at character {e.start}), which is not valid Unicode",
                           param=path) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(k, path)
            _check_value(v, f"{path}.{k}" if path else k, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(v, f"{path}[{i}]", depth + 1)


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: not UTF-8 at byte {e.start}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # the C parser stops at Python's recursion limit; _check_value at ours
        raise APIError(400, f"the request body is not valid JSON for this server: nested deeper than "
                            f"{MAX_JSON_DEPTH} levels") from None
    _check_value(body, "")
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}: {text.strip()[:60]}")
    return body


def key_matches(authorization: str | None, keys: tuple[str, ...]) -> bool:
    """Whether `Authorization: Bearer KEY` names one of `keys`; every key is compared, in constant time."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    given = authorization[len("Bearer "):].strip().encode()
    found = False
    for k in keys:
        found |= hmac.compare_digest(given, k.encode())
    return found


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A rank's exception as a client may read it: the root cause's type and its first line, without
    ANSI colours, pids, actor ids or the reprs Ray's wrappers add around it."""
    cause = exc
    while isinstance(getattr(cause, "cause", None), BaseException) and cause.cause is not cause:
        cause = cause.cause  # RayTaskError -> the exception the rank raised
    lines = [ln.strip() for ln in _ANSI.sub("", str(cause)).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("ray::", "Traceback", "File "))]
    line = _NOISE.sub("", lines[0]).strip() if lines else ""
    msg = f"{type(cause).__name__}: {line}" if line else type(cause).__name__
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."
