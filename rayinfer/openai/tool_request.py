"""The request side of tool calling: `tools` and `tool_choice` read, bounded and validated into the tool list the
chat template renders and whether the output is parsed for calls. Owns their 400s: at most `max_tools` tools (OpenAI's
128), all of them together at most MAX_TOOLS_CHARS of JSON (the schema bound structured output uses), names as
OpenAI spells them. `tool_choice` "auto" and "none" are served; "required" and a named function need
grammar-constrained decoding and are a 400 until then. The output side is rayinfer.openai.tool_calls."""
from __future__ import annotations

import json
import re

from rayinfer.openai.errors import APIError, _bad
from rayinfer.openai.limits import RequestLimits, _check_count
from rayinfer.openai.structured import MAX_CONSTRAINT_CHARS as MAX_TOOLS_CHARS

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _tool(t, at: str) -> dict:
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise _bad(at, t, 'each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    fn = t["function"]
    for key in fn:
        if key not in ("name", "description", "parameters", "strict"):
            raise _bad(f"{at}.function.{key}", fn[key], "unknown function field")
    if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
        raise _bad(f"{at}.function.name", fn.get("name"), "must be 1 to 64 letters, digits, '_' or '-'")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise _bad(f"{at}.function.description", fn["description"], "must be a string")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise _bad(f"{at}.function.parameters", fn["parameters"], "must be a JSON schema object")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise _bad(f"{at}.function.strict", fn["strict"], "must be true or false")
    return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


def parse_tools(body: dict, limits: RequestLimits) -> tuple[list[dict] | None, bool]:
    """-> (the tools for the chat template or None, whether the output is parsed for tool calls)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", tools, "must be a list of tools")
    tools = tools or None
    if choice is not None and not (isinstance(choice, str) and choice in ("auto", "none")):
        if choice == "required" or isinstance(choice, dict):
            raise APIError(400, f"'tool_choice'={json.dumps(choice)[:200]} is not supported by this server yet "
                                "(it needs grammar-constrained decoding): use \"auto\" or \"none\"",
                           param="tool_choice")
        raise _bad("tool_choice", choice, 'must be "auto", "none", "required" or {"type": "function", ...}')
    if tools is None:
        if choice == "auto":
            raise _bad("tool_choice", choice, "is only allowed when 'tools' are specified")
        return None, False
    _check_count(len(tools), limits.max_tools, "tools", "tools", "max_tools")
    size = len(json.dumps(tools, separators=(",", ":")))
    if size > MAX_TOOLS_CHARS:
        raise _bad("tools", f"<{size} characters of JSON>", f"at most {MAX_TOOLS_CHARS} characters in all")
    out = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise _bad("tools", sorted({n for n in names if names.count(n) > 1}), "tool names must be unique")
    return out, choice != "none"
