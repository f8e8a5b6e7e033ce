"""OpenAI's error object: `APIError` is what every layer of the HTTP edge raises for a client.

Owns the mapping from an HTTP status to OpenAI's error `type`, and the one way a bad value is
named in a message (`_bad`). Crossing it: a status, a message naming the bad value, optionally the
parameter and a code; `to_dict()` is the response body.
"""
from __future__ import annotations

import json

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the HTTP layer returns as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _show(value) -> str:
    try:
        s = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def _bad(param: str, value, why: str) -> APIError:
    return APIError(400, f"Invalid value for '{param}': {_show(value)} ({why})", param=param)


