"""DeepSeek's special-token strings (reasoning, tool calls, FIM) and the one primitive the streaming parsers share:
splitting text at a marker while holding back any tail that could be the marker's beginning, so that a marker
split across deltas (at any character) is never emitted as text."""
from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"


def split_at(buf: str, marker: str) -> tuple[str, bool, str]:
    """-> (text before the marker, whether it was found, what remains). Not found: the remainder is the
    longest tail of `buf` that begins `marker`, held until the next delta says whether it is one."""
    i = buf.find(marker)
    if i >= 0:
        return buf[:i], True, buf[i + len(marker):]
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if marker.startswith(buf[-k:]):
            return buf[:-k], False, buf[-k:]
    return buf, False, ""
