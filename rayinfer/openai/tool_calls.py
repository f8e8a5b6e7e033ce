"""Parses DeepSeek's tool-call token formats out of a model's content, incrementally, into OpenAI tool-call deltas.

V3 and R1:  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>...
            <｜tool▁calls▁end｜>
V3.1:       <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
Text before the calls is content; a call's name is sent once complete, its arguments as they arrive (a marker or
fence split across deltas is held back, never sent). Crossing it: content text in; content text and deltas
`{"index", "id", "type", "function": {"name", "arguments"}}` out."""
from __future__ import annotations

import uuid

from rayinfer.openai.markers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP, split_at

FORMATS = ("v3", "v3.1")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    def __init__(self, fmt: str = "v3"):
        assert fmt in FORMATS, fmt
        self.fmt = fmt
        self.state = "content"  # content -> calls -> (type ->) name -> (fence ->) args -> (call_end ->) calls -> done
        self.buf = ""
        self.index = -1
        self.ws = ""  # whitespace inside arguments, held until more follows (trailing whitespace is dropped)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """-> (content delta, tool-call deltas) for this piece of content."""
        self.buf += text
        content: list[str] = []
        deltas: list[dict] = []
        while self.buf and self._step(deltas, content):
            pass
        return "".join(content), deltas

    def _step(self, deltas: list, content_out: list) -> bool:
        """Advances one state; False when it needs more text."""
        s = self.state
        if s == "content":
            emit, found, self.buf = split_at(self.buf, CALLS_BEGIN)
            content_out.append(emit)
            if found:
                self.state = "calls"
            return found
        if s == "calls":
            self.buf = self.buf.lstrip()
            for marker, nxt in ((CALL_BEGIN, "type" if self.fmt == "v3" else "name"), (CALLS_END, "done")):
                if self.buf.startswith(marker):
                    self.buf, self.state = self.buf[len(marker):], nxt
                    return True
                if marker.startswith(self.buf):
                    return False
            self.state = "done"  # anything else after a call ends the calls
            return True
        if s == "type":  # V3's "function" before the separator
            _, found, rest = split_at(self.buf, TOOL_SEP)
            if found:
                self.buf, self.state = rest, "name"
            return found
        if s == "name":
            end = "\n" if self.fmt == "v3" else TOOL_SEP
            name, found, rest = split_at(self.buf, end)
            if not found:
                return False
            self.index += 1
            self.buf, self.state, self.ws = rest, "fence" if self.fmt == "v3" else "args", ""
            deltas.append({"index": self.index, "id": new_call_id(), "type": "function",
                           "function": {"name": name.strip(), "arguments": ""}})
            return True
        if s == "fence":  # the line that opens V3's ```json block
            if "\n" not in self.buf:
                return False
            self.buf, self.state = self.buf.split("\n", 1)[1], "args"
            return True
        if s == "args":
            emit, found, self.buf = split_at(self.buf, "```" if self.fmt == "v3" else CALL_END)
            text = self.ws + emit
            body = text.rstrip()
            self.ws = text[len(body):]
            if body:
                deltas.append({"index": self.index, "function": {"arguments": body}})
            if found:
                self.state = "call_end" if self.fmt == "v3" else "calls"
            return found
        if s == "call_end":
            self.buf = self.buf.lstrip()
            if self.buf.startswith(CALL_END):
                self.buf, self.state = self.buf[len(CALL_END):], "calls"
                return True
            if CALL_END.startswith(self.buf):
                return False
            self.state = "calls"
            return True
        self.buf = ""  # done: what follows the calls is not content
        return False

    def finish(self) -> str:
        """Held-back text at the end: content if no call began (a marker's prefix that never completed)."""
        rest, self.buf = self.buf, ""
        return rest if self.state == "content" else ""


def parse_tool_calls(text: str, fmt: str = "v3") -> tuple[str, list[dict]]:
    """A whole content -> (content before the calls, [{"id", "type", "function": {"name", "arguments"}}])."""
    p = ToolCallParser(fmt)
    content, deltas = p.feed(text)
    content += p.finish()
    calls: list[dict] = []
    for d in deltas:
        if "id" in d:
            calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return content, calls
