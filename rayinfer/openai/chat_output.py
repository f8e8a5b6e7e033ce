"""A chat choice's output split into `reasoning_content` and `content`: which reasoning parser the served model uses,
and the split itself, whole (one response) and incrementally (stream chunks, reasoning deltas before content deltas).

Which parser: the serve option `reasoning_parser` ("deepseek_r1", or "none" to turn it off) wins; without it, a
checkpoint whose chat template writes `</think>` (DeepSeek-R1's and V3.1's) gets "deepseek_r1". A request's output
starts inside the reasoning when its rendered prompt ends with `<think>` (R1's template, V3.1 with thinking on).
Crossing it: a tokenizer / prompt text / the choices' text deltas in; plain strings and chunk dicts out
(shaped by `rayinfer.openai.responses`)."""
from __future__ import annotations

from rayinfer.openai.markers import THINK_END, THINK_START
from rayinfer.openai.reasoning import ReasoningParser, split_reasoning
from rayinfer.openai.responses import chat_chunk

REASONING_PARSERS = ("deepseek_r1",)


def choose_reasoning_parser(option: str | None, tokenizer) -> str | None:
    """The parser a served model's chat responses go through, or None (content only)."""
    if option is not None:
        if option != "none" and option not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser={option!r}: must be one of {', '.join(REASONING_PARSERS)} or 'none'")
        return None if option == "none" else option
    template = getattr(tokenizer, "chat_template", None) or ""
    return "deepseek_r1" if THINK_END in template else None


def starts_in_reasoning(prompt_text: str) -> bool:
    return prompt_text.rstrip().endswith(THINK_START)


def split_message(text: str, starts: bool | None) -> dict:
    """The assistant message of a whole output; `starts`: None without a reasoning parser, else whether the
    output begins inside the reasoning."""
    if starts is None:
        return {"role": "assistant", "content": text}
    reasoning, content = split_reasoning(text, starts)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning}


class StreamSplit:
    """The chunks of every choice of one streamed chat request: each choice's text deltas through its own parser."""

    def __init__(self, rid: str, created: int, model: str, count: int, starts: bool | None):
        self.head = (rid, created, model)
        self.parsers = None if starts is None else [ReasoningParser(starts) for _ in range(count)]

    def chunks(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> list[dict]:
        """Chunks for one delta of choice `index`: its reasoning, then its content (with the finish reason).
        Text that may be the start of a marker is held back and comes with a later delta, or at the end."""
        if self.parsers is None:
            return [chat_chunk(*self.head, index, text, finish_reason, logprobs=logprobs)]
        p = self.parsers[index]
        reasoning, content = p.feed(text)
        if finish_reason is not None:
            r, c = p.finish()
            reasoning, content = reasoning + r, content + c
        out = []
        if reasoning:
            out.append(chat_chunk(*self.head, index, None, None, logprobs=logprobs, reasoning=reasoning))
            logprobs = None
        if content or finish_reason is not None or logprobs is not None:
            out.append(chat_chunk(*self.head, index, content, finish_reason, logprobs=logprobs))
        return out
