"""A chat choice's output shaped into the assistant message: `reasoning_content`, `content` and `tool_calls`, whole
(one response) and incrementally (stream chunks: reasoning deltas, then content, then tool-call deltas).

Which reasoning parser: the serve option `reasoning_parser` ("deepseek_r1", or "none" to turn it off) wins; without
it, a checkpoint whose chat template writes `</think>` (DeepSeek-R1's and V3.1's) gets "deepseek_r1". A request's
output starts inside the reasoning when its rendered prompt ends with `<think>` (R1's template, V3.1 with thinking
on). Tool calls are parsed (rayinfer.openai.tool_calls) out of the content when the request sent tools and did not
say `tool_choice: "none"`, in the format the checkpoint's template writes: V3/R1's (a ```json block) or V3.1's;
under a named `tool_choice` the whole (grammar-constrained) output is that function's arguments, and the finish
reason stays "stop", as OpenAI reports a forced call; under "required" the output is a JSON list of calls, parsed
whole (streamed as complete tool-call deltas at the end).
Crossing it: a tokenizer / prompt text / the choices' text deltas in; message and chunk dicts out (chunks shaped by
`rayinfer.openai.responses`)."""
from __future__ import annotations

import json

from rayinfer.openai.markers import CALLS_BEGIN, THINK_END, THINK_START
from rayinfer.openai.reasoning import ReasoningParser, split_reasoning
from rayinfer.openai.responses import chat_chunk
from rayinfer.openai.tool_calls import ToolCallParser, new_call_id, parse_tool_calls

REASONING_PARSERS = ("deepseek_r1",)


def choose_reasoning_parser(option: str | None, tokenizer) -> str | None:
    """The parser a served model's chat responses go through, or None (content only)."""
    if option is not None:
        if option != "none" and option not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser={option!r}: must be one of {', '.join(REASONING_PARSERS)} or 'none'")
        return None if option == "none" else option
    return "deepseek_r1" if THINK_END in _template(tokenizer) else None


def tool_format_of(tokenizer) -> str:
    """V3.1's templates write a call as NAME<｜tool▁sep｜>ARGS; V3's and R1's (and a template without tools) as a
    ```json block."""
    template = _template(tokenizer)
    return "v3.1" if CALLS_BEGIN in template and "```json" not in template else "v3"


def _template(tokenizer) -> str:
    return (getattr(tokenizer, "chat_template", None) or "") if tokenizer is not None else ""


def starts_in_reasoning(prompt_text: str) -> bool:
    return prompt_text.rstrip().endswith(THINK_START)


def split_message(text: str, spec) -> tuple[dict, bool]:
    """(the assistant message, whether the model chose to call tools) of a whole output of a chat `RequestSpec`:
    `spec.reasoning` None without a reasoning parser, else whether the output begins inside the reasoning;
    `spec.tool_format` None when the output is not parsed for tool calls; `spec.forced_tool`: the function whose
    arguments the whole output is (a forced call: not the model's choice)."""
    if spec.forced_tool is not None:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": new_call_id(), "type": "function", "function": {"name": spec.forced_tool, "arguments": text}}]}, False
    if spec.tools_required:
        calls = required_calls(text)
        return ({"role": "assistant", "content": None, "tool_calls": calls}, True) if calls else \
            ({"role": "assistant", "content": text}, False)
    msg = {"role": "assistant", "content": text}
    if spec.reasoning is not None:
        msg["reasoning_content"], msg["content"] = split_reasoning(text, spec.reasoning)
    if spec.tool_format is not None:
        content, calls = parse_tool_calls(msg["content"], spec.tool_format)
        if calls:
            msg["content"], msg["tool_calls"] = content or None, calls
    return msg, "tool_calls" in msg


def required_calls(text: str) -> list[dict]:
    """The calls of a `tool_choice: "required"` output (a JSON list the grammar kept to the tools' schemas); none
    when it was cut off (finish reason "length") before the list closed."""
    try:
        return [{"id": new_call_id(), "type": "function",
                 "function": {"name": it["name"], "arguments": json.dumps(it["parameters"], ensure_ascii=False)}}
                for it in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        return []


class _Choice:
    def __init__(self, spec):
        self.reasoning = None if spec.reasoning is None else ReasoningParser(spec.reasoning)
        self.tools = None if spec.tool_format is None else ToolCallParser(spec.tool_format)
        self.forced, self.called = spec.forced_tool, False
        self.required, self.held = spec.tools_required, ""

    def feed(self, text: str, last: bool) -> tuple[str, str, list[dict]]:
        if self.forced is not None:  # the whole output is the arguments of one call, opened by the first delta
            if not text:
                return "", "", []
            first, self.called = not self.called, True
            fn = {"name": self.forced, "arguments": text} if first else {"arguments": text}
            return "", "", [{"index": 0, "id": new_call_id(), "type": "function", "function": fn} if first else
                            {"index": 0, "function": fn}]
        if self.required:  # a list of calls is parsed whole: sent complete at the end
            self.held += text
            if not last:
                return "", "", []
            calls = [dict(c, index=i) for i, c in enumerate(required_calls(self.held))]
            self.called = bool(calls)
            return "", "" if calls else self.held, calls
        reasoning, content, calls = "", text, []
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if last:
                r, c = self.reasoning.finish()
                reasoning, content = reasoning + r, content + c
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if last:
                content += self.tools.finish()
            self.called = self.called or bool(calls)
        return reasoning, content, calls


class StreamSplit:
    """The chunks of every choice of one streamed chat request, each choice's text deltas through its own parsers."""

    def __init__(self, rid: str, created: int, model: str, count: int, spec):
        self.head = (rid, created, model)
        self.choices = [_Choice(spec) for _ in range(count)]
        self.forced = spec.forced_tool is not None

    def chunks(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> list[dict]:
        """Chunks for one delta of choice `index`: its reasoning, its content, its tool-call deltas; the first
        carries the delta's logprobs, the last its finish reason. Text that may begin a marker is held back and
        comes with a later delta, or at the end."""
        choice = self.choices[index]
        reasoning, content, calls = choice.feed(text, finish_reason is not None)
        parts = [p for p in ({"reasoning": reasoning}, {"delta_text": content}, {"tool_calls": calls}) if
                 next(iter(p.values()))]
        if not parts and (finish_reason is not None or logprobs is not None):
            parts = [{}]
        out = []
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            out.append(chat_chunk(*self.head, index, part.get("delta_text"), finish_reason if last else None,
                                  logprobs=logprobs if k == 0 else None, reasoning=part.get("reasoning"),
                                  tool_calls=part.get("tool_calls"), called=choice.called and not self.forced))
        return out
