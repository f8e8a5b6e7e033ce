"""Splits a DeepSeek model's output into `reasoning_content` and `content`, incrementally (one parser per choice,
fed the detokenized deltas): R1's `<think>...</think>` and V3.1's thinking mode. `starts_in_reasoning` is true when
the prompt itself ended inside `<think>` (R1's template and V3.1 with thinking on prefill it), so the output's first
text is reasoning until `</think>`; otherwise only an output that opens with `<think>` reasons. The blank lines
DeepSeek puts after `</think>` are not content."""
from __future__ import annotations

from rayinfer.openai.markers import THINK_END, THINK_START, split_at


class ReasoningParser:
    def __init__(self, starts_in_reasoning: bool):
        self.starts_in_reasoning = starts_in_reasoning
        self.state = "start"  # start -> reasoning -> content
        self.buf = ""
        self.strip_pending = False
        self.reasoned = False  # the output had a reasoning part (possibly empty)

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta) for this piece of output text."""
        self.buf += text
        reasoning = content = ""
        while self.buf:
            if self.state == "start":
                if self.buf.startswith(THINK_START):
                    self.buf, self.state, self.reasoned = self.buf[len(THINK_START):], "reasoning", True
                elif THINK_START.startswith(self.buf):
                    break
                else:
                    self.state = "reasoning" if self.starts_in_reasoning else "content"
                    self.reasoned = self.starts_in_reasoning
            elif self.state == "reasoning":
                emit, found, self.buf = split_at(self.buf, THINK_END)
                reasoning += emit
                if not found:
                    break
                self.state, self.strip_pending = "content", True
            else:
                if self.strip_pending:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        break
                    self.strip_pending = False
                content, self.buf = content + self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The text held back at the end of the output (a partial marker that never completed)."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning" or (self.state == "start" and self.starts_in_reasoning):
            return rest, ""
        return "", rest.lstrip() if self.strip_pending else rest


def split_reasoning(text: str, starts_in_reasoning: bool) -> tuple[str | None, str]:
    """A whole output -> (reasoning_content or None when the model did not reason, content)."""
    p = ReasoningParser(starts_in_reasoning)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    reasoning = r1 + r2
    return (reasoning if p.reasoned or (starts_in_reasoning and not text) else None), c1 + c2
