"""The request fields that constrain output to a grammar, read into SamplingParams.structured ((kind, text)):
OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's `structured_outputs` (`json`, `regex`, `choice`,
`grammar`, exactly one). Owns their bounds (text size, number of choices) and the 400 for a constraint that does not
compile or a server without xgrammar; the engine side is rayinfer.engine.grammar."""
from __future__ import annotations

import json

from rayinfer.openai.errors import APIError, _bad

MAX_CONSTRAINT_CHARS = 65536
MAX_CHOICES = 256


def _checked(kind: str, text: str, param: str) -> tuple[str, str]:
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise _bad(param, f"<{len(text)} characters>", f"at most {MAX_CONSTRAINT_CHARS} characters")
    from rayinfer.engine.grammar import check_structured  # no torch at import

    try:
        check_structured(kind, text)
    except ValueError as e:
        raise APIError(400, f"Invalid value for '{param}': {e}", param=param) from e
    return kind, text


def _schema_text(schema, param: str) -> str:
    if isinstance(schema, str):
        return schema
    if not isinstance(schema, dict):
        raise _bad(param, schema, "must be a JSON schema object")
    return json.dumps(schema, separators=(",", ":"))


def json_schema_constraint(schema, param: str) -> tuple[str, str]:
    """A JSON schema (object or text) as a checked constraint; `param` names it in the 400."""
    return _checked("json", _schema_text(schema, param), param)


def parse_structured(body: dict) -> tuple[str, str] | None:
    fmt, so = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and so is not None:
        raise _bad("structured_outputs", so, "send either response_format or structured_outputs, not both")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return _checked("json", "", "response_format")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise _bad("response_format.json_schema", spec, 'must be {"name": ..., "schema": {...}}')
            return _checked("json", _schema_text(spec["schema"], "response_format.json_schema.schema"),
                            "response_format.json_schema.schema")
        raise _bad("response_format", fmt, 'type must be "text", "json_object" or "json_schema"')
    if so is None:
        return None
    keys = [k for k in ("json", "regex", "choice", "grammar") if so.get(k) is not None] if isinstance(so, dict) else []
    if not isinstance(so, dict) or len(keys) != 1 or set(so) - {"json", "regex", "choice", "grammar"}:
        raise _bad("structured_outputs", so, "must hold exactly one of json, regex, choice, grammar")
    key, value = keys[0], so[keys[0]]
    param = f"structured_outputs.{key}"
    if key == "json":
        return _checked("json", _schema_text(value, param), param)
    if key == "choice":
        if not isinstance(value, list) or not value or len(value) > MAX_CHOICES \
                or not all(isinstance(c, str) and c for c in value):
            raise _bad(param, value, f"must be a list of 1 to {MAX_CHOICES} non-empty strings")
        return _checked("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise _bad(param, value, "must be a non-empty string")
    return _checked(key, value, param)
