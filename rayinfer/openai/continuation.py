"""Prompts that make the model continue given text: DeepSeek's chat prefix completion and FIM completion.

Owns two prompt constructions and their 400s. Chat prefix completion: a last message
`{"role": "assistant", "content": "...", "prefix": true}` is rendered by the checkpoint's own chat template as
a finished turn, and the prompt is cut right after its content (the end of turn the template writes after it
goes, as transformers' `continue_final_message` does), so the model writes on from that text; the response
holds only what it writes. FIM (`suffix` on `/v1/completions`): each prompt becomes
`<｜fim▁begin｜>{prompt}<｜fim▁hole｜>{suffix}<｜fim▁end｜>` with the checkpoint tokenizer's FIM tokens, and the
model writes the middle. Crossing it: messages or prompt strings and a tokenizer in; rendered text out, or an
`APIError`.
"""
from __future__ import annotations

from rayinfer.openai.errors import APIError, _bad
from rayinfer.openai.markers import FIM_BEGIN, FIM_END, FIM_HOLE


def prefix_message(messages: list) -> int | None:
    """Index of the message asking for prefix completion (it must be the last, an assistant's, with text)."""
    asked = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("prefix") not in (None, False)]
    if not asked:
        return None
    i = asked[-1]
    m = messages[i]
    if m.get("prefix") is not True:
        raise _bad(f"messages[{i}].prefix", m.get("prefix"), "must be true or false")
    if i != len(messages) - 1 or len(asked) > 1 or m.get("role") != "assistant":
        raise _bad(f"messages[{i}].prefix", True, "only the last message, an assistant's, may be a prefix to continue")
    if not isinstance(m.get("content"), str) or not m["content"]:
        raise _bad(f"messages[{i}].content", m.get("content"), "a prefix message needs its text as a non-empty string")
    return i


def cut_after_prefix(rendered: str, content: str) -> str:
    """The rendered conversation up to the end of the last message's content (its end of turn dropped)."""
    at = rendered.rfind(content)
    if at < 0:
        raise APIError(400, "This model's chat template does not show the prefix message's content as given, so it "
                            "cannot be continued", param="messages")
    return rendered[:at + len(content)]


def fim_prompts(prompt, suffix: str, tokenizer) -> list[str]:
    """The FIM prompt of each string prompt; a 400 naming the problem when the tokenizer has no FIM tokens."""
    missing = [t for t in (FIM_BEGIN, FIM_HOLE, FIM_END) if tokenizer is None or tokenizer.token_id(t) is None]
    if missing:
        raise APIError(400, f"'suffix' asks for fill-in-the-middle, which needs the FIM tokens {FIM_BEGIN}, "
                            f"{FIM_HOLE} and {FIM_END} in the model's tokenizer; this model's tokenizer lacks "
                            f"{', '.join(missing)}", param="suffix")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _bad("prompt", prompt, "with a suffix, the prompt must be a string or a list of strings")
    return [f"{FIM_BEGIN}{p}{FIM_HOLE}{suffix}{FIM_END}" for p in prompts]
