"""DeepSeek's reasoning and tool-call output formats parsed from scripted outputs, whole and streamed: every
stream is split at every character (so inside every special token) and must give the same result as the whole."""
import json

import pytest

from rayinfer.openai.markers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP
from rayinfer.openai.reasoning import ReasoningParser, split_reasoning
from rayinfer.openai.tool_calls import ToolCallParser, parse_tool_calls

R1 = "<think>\nThe user greets.\n</think>\n\nHello! <b>hi</b>"
V3_CALLS = (f"Let me check.{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n"
            f'{{"city": "Paris", "n": [1, 2]}}\n```{CALL_END}\n{CALL_BEGIN}function{TOOL_SEP}now\n```json\n{{}}\n```'
            f"{CALL_END}{CALLS_END}")
V31_CALLS = (f"{CALLS_BEGIN}{CALL_BEGIN}get_weather{TOOL_SEP}{{\"city\": \"Paris <x>\"}}{CALL_END}"
             f"{CALL_BEGIN}now{TOOL_SEP}{{}}{CALL_END}{CALLS_END}")


def _splits(text):
    """Every way of cutting `text` in two, plus one character at a time."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)


def _stream_reasoning(pieces, starts):
    p = ReasoningParser(starts)
    r = c = ""
    for piece in pieces:
        dr, dc = p.feed(piece)
        r, c = r + dr, c + dc
    dr, dc = p.finish()
    return r + dr, c + dc


@pytest.mark.parametrize("text,starts,want", [
    (R1, False, ("\nThe user greets.\n", "Hello! <b>hi</b>")),
    ("Reasoning only so far </think>\n\nAnswer", True, ("Reasoning only so far ", "Answer")),  # R1 template: prompt ends in <think>
    ("Plain answer <thin", False, (None, "Plain answer <thin")),
    ("<think>cut off mid-thou", False, ("cut off mid-thou", "")),
    ("still thinking </thi", True, ("still thinking </thi", "")),
    ("<thinking is not the tag", False, (None, "<thinking is not the tag")),
])
def test_reasoning_split_whole_and_at_every_character(text, starts, want):
    assert split_reasoning(text, starts) == want
    for pieces in _splits(text):
        assert _stream_reasoning(pieces, starts) == (want[0] or "", want[1]), pieces


def _stream_calls(pieces, fmt):
    p = ToolCallParser(fmt)
    content, calls = "", {}
    for piece in pieces:
        dc, deltas = p.feed(piece)
        content += dc
        for d in deltas:
            assert not any(m in d["function"].get("arguments", "") for m in (CALL_END, "```", TOOL_SEP))
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function"
                calls[d["index"]] = [d["function"]["name"], ""]
            else:
                calls[d["index"]][1] += d["function"]["arguments"]
    return content + p.finish(), [tuple(v) for _, v in sorted(calls.items())]


@pytest.mark.parametrize("text,fmt,content,calls", [
    (V3_CALLS, "v3", "Let me check.", [("get_weather", {"city": "Paris", "n": [1, 2]}), ("now", {})]),
    (V31_CALLS, "v3.1", "", [("get_weather", {"city": "Paris <x>"}), ("now", {})]),
    ("No tools here <｜tool▁calls", "v3", "No tools here <｜tool▁calls", []),
])
def test_tool_calls_whole_and_at_every_character(text, fmt, content, calls):
    got_content, got = parse_tool_calls(text, fmt)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)
    for pieces in _splits(text):
        streamed_content, streamed = _stream_calls(pieces, fmt)
        assert streamed_content == content, pieces
        assert [(n, json.loads(a)) for n, a in streamed] == calls, pieces


def test_reasoning_then_tool_calls_chain():
    """R1 with tools: the reasoning parser's content feeds the tool parser."""
    text = "<think>need weather</think>\n\n" + V3_CALLS
    reasoning, content = split_reasoning(text, False)
    assert reasoning == "need weather"
    rest, calls = parse_tool_calls(content, "v3")
    assert rest == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "now"]
