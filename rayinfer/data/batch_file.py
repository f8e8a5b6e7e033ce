"""OpenAI batch files: the input lines' envelope, the output lines, and resuming into an existing output.

Owns the file format and nothing about running it. An input line is `{"custom_id", "method": "POST",
"url": "/v1/chat/completions" | "/v1/completions", "body": {...}}`; the body itself is checked later by the
HTTP server's validators (rayinfer.data.rows), this module checks only the envelope. An output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {"code", "message"} | null}`.
A line whose envelope is unreadable gets the deterministic id `batch_req_line<N>` (and its custom_id, when one
could be read), so a resumed run recognises it too.

Resuming: the output is appended to and never rewritten locally; a last line cut short by a crash is
dropped before appending (`open_output`), and the keys (custom_id, or id where there is none) of the complete
lines already there are skipped. Paths are local or any URI `pyarrow.fs` opens; a filesystem that cannot append
(object stores) gets its complete lines rewritten first, then the new ones.
"""
from __future__ import annotations

import hashlib
import json
import os

from rayinfer.data.rows import ENDPOINTS


def _fs(uri: str):
    import pyarrow.fs as pafs

    if "://" not in uri:
        return None, os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def read_lines(uri: str) -> list[str]:
    """The input's lines (OpenAI bounds batch files at 50,000 requests / 200 MB: a driver holds them)."""
    fs, path = _fs(uri)
    try:
        if fs is None:
            with open(path, "rb") as f:
                data = f.read()
        else:
            with fs.open_input_stream(path) as f:
                data = f.read()
    except (OSError, FileNotFoundError) as e:
        raise ValueError(f"cannot read the batch input {uri!r}: {e}") from None
    return data.decode("utf-8", errors="replace").splitlines()


def request_id(custom_id: str) -> str:
    return "batch_req_" + hashlib.sha256(custom_id.encode()).hexdigest()[:24]


def envelope(line_no: int, text: str) -> tuple[dict | None, dict | None]:
    """(request, None) for a well-formed line, (None, output line) for one that cannot be run."""
    custom_id = None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, error_line(line_no, None, f"line {line_no} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return None, error_line(line_no, None, f"line {line_no} must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, error_line(line_no, None, f"line {line_no}: 'custom_id' must be a non-empty string, "
                                               f"got {custom_id!r}")
    if obj.get("method") != "POST":
        return None, error_line(line_no, custom_id, f"'method' must be \"POST\", got {obj.get('method')!r}")
    if obj.get("url") not in ENDPOINTS:
        return None, error_line(line_no, custom_id, f"'url' must be one of {', '.join(ENDPOINTS)}, "
                                                    f"got {obj.get('url')!r}")
    if not isinstance(obj.get("body"), dict):
        return None, error_line(line_no, custom_id, "'body' must be a JSON object (the request)")
    return {"custom_id": custom_id, "openai_url": obj["url"], "openai_line": text}, None


def error_line(line_no: int, custom_id: str | None, message: str) -> dict:
    rid = request_id(custom_id) if custom_id else f"batch_req_line{line_no}"
    return {"id": rid, "custom_id": custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}


def result_line(custom_id: str, status_code: int, body: dict, error: str | None) -> dict:
    """One request's outcome; a request the server's validators refused carries their error object in
    `response.body` and its message in `error`."""
    rid = request_id(custom_id)
    err = None if error is None else {"code": (body.get("error") or {}).get("code") or "invalid_request",
                                      "message": error}
    return {"id": rid, "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": rid, "body": body}, "error": err}


def line_key(obj: dict) -> str:
    return obj.get("custom_id") or obj["id"]


class Output:
    """The output file, opened for appending after the complete lines already in it."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = _fs(uri)
        self._rewrite = False  # set when a torn line inside the file means appending is not enough
        kept = self._existing()
        self.done = set()
        for line in kept:
            self.done.add(line_key(json.loads(line)))
        self._open(kept)

    def _existing(self) -> list[str]:
        try:
            if self.fs is None:
                with open(self.path, "rb") as f:
                    data = f.read()
            else:
                with self.fs.open_input_stream(self.path) as f:
                    data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # what follows the last newline was cut off mid-write
        if self.fs is None and len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        lines = complete.decode("utf-8").splitlines()
        good = []
        for line in lines:
            try:
                json.loads(line)
                good.append(line)
            except json.JSONDecodeError:  # a torn line inside the file: a filesystem that reordered writes
                continue
        if len(good) < len(lines):
            self._rewrite = True
        return good

    def _open(self, kept: list[str]) -> None:
        if self.fs is None and not self._rewrite:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.f = open(self.path, "ab")
            return
        if self.fs is None:
            self.f = open(self.path, "wb")
        else:
            try:
                if kept and not self._rewrite:
                    self.f = self.fs.open_append_stream(self.path)
                    return
            except NotImplementedError:
                pass
            self.f = self.fs.open_output_stream(self.path)
        for line in kept:
            self.f.write(line.encode() + b"\n")

    def write(self, obj: dict) -> None:
        key = line_key(obj)
        assert key not in self.done, f"{key!r} would be written twice"
        self.done.add(key)
        self.f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")

    def flush(self) -> None:
        self.f.flush()
        if self.fs is None:
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.flush()
        self.f.close()
