"""The request side of tool calling: `tools` and `tool_choice` read, bounded and validated into the tool list the
chat template renders and whether the output is parsed for calls. Owns their 400s: at most `max_tools` tools (OpenAI's
128), all of them together at most MAX_TOOLS_CHARS of JSON (the schema bound structured output uses), names as
OpenAI spells them. `tool_choice` "auto" and "none" are served, and a named function by grammar-constrained
decoding: the output is that function's arguments, constrained to its `parameters` schema (so they always parse and
match), and so is "required": the output is a JSON list of calls `[{"name": ..., "parameters": {...}}]`, each
item one of the tools with its own schema (one item when `parallel_tool_calls` is false). Neither can be combined
with another constraint (`response_format`, `structured_outputs`). The output side is rayinfer.openai.tool_calls and chat_output."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rayinfer.openai.errors import APIError, _bad
from rayinfer.openai.limits import RequestLimits, _check_count
from rayinfer.openai.structured import MAX_CONSTRAINT_CHARS as MAX_TOOLS_CHARS
from rayinfer.openai.structured import json_schema_constraint

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


@dataclass(frozen=True)
class ToolUse:
    tools: list[dict] | None = None  # what the chat template renders
    parse: bool = False  # the output is parsed for tool calls (tool_choice "auto")
    forced: str | None = None  # tool_choice names this function: the output is its arguments
    required: bool = False  # tool_choice "required": the output is a JSON list of calls
    constraint: tuple[str, str] | None = None  # SamplingParams.structured for a forced or required call


def _named(choice) -> str | None:
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad("tool_choice", choice, 'a named choice is {"type": "function", "function": {"name": ...}}')
    return name


def parse_tools(body: dict, limits: RequestLimits) -> ToolUse:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", tools, "must be a list of tools")
    tools = tools or None
    if choice is not None and not isinstance(choice, dict) and choice not in ("auto", "none", "required"):
        raise _bad("tool_choice", choice, 'must be "auto", "none", "required" or {"type": "function", ...}')
    forced = _named(choice) if isinstance(choice, dict) else None
    if tools is None:
        if choice is not None and choice != "none":
            raise _bad("tool_choice", choice, "is only allowed when 'tools' are specified")
        return ToolUse()
    _check_count(len(tools), limits.max_tools, "tools", "tools", "max_tools")
    size = len(json.dumps(tools, separators=(",", ":")))
    if size > MAX_TOOLS_CHARS:
        raise _bad("tools", f"<{size} characters of JSON>", f"at most {MAX_TOOLS_CHARS} characters in all")
    out = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise _bad("tools", sorted({n for n in names if names.count(n) > 1}), "tool names must be unique")
    if forced is None and choice != "required":
        return ToolUse(out, choice != "none")
    if forced is not None and forced not in names:
        raise _bad("tool_choice.function.name", forced, "names no function in 'tools'")
    if body.get("response_format") not in (None, {"type": "text"}) or body.get("structured_outputs") is not None:
        raise APIError(400, f"'tool_choice'={json.dumps(choice)[:200]} constrains the output to tool calls; it cannot "
                            "be combined with response_format or structured_outputs", param="tool_choice")
    if forced is not None:
        schema = _parameters(out[names.index(forced)])
        return ToolUse(out, forced=forced, constraint=json_schema_constraint(
            schema, f"tools[{names.index(forced)}].function.parameters"))
    items = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                         "parameters": _parameters(t)},
                        "required": ["name", "parameters"]} for t in out]}
    one = body.get("parallel_tool_calls") is False
    schema = {"type": "array", "minItems": 1, **({"maxItems": 1} if one else {}), "items": items}
    return ToolUse(out, required=True, constraint=json_schema_constraint(schema, "tools"))


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters", {"type": "object"})
