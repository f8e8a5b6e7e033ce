"""The incremental detokenizer on a one-byte-per-token tokenizer: exact text, bounded decode windows."""
import random

from rayinfer.engine.detokenizer import MAX_CHAR_TOKENS, IncrementalDetokenizer


class ByteTokenizer:
    """Token id = byte value; records the longest id list it was asked to decode."""

    def __init__(self):
        self.widest = 0

    def decode(self, ids):
        self.widest = max(self.widest, len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


def detokenize(data: bytes, stop=()):
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok, stop)
    streamed = ""
    for b in data:
        if d.add(b):  # a stop string: the engine ends the request here
            break
        streamed += d.take(False)
    return d, streamed + d.take(True), tok.widest


def test_a_long_run_of_lone_lead_bytes_keeps_the_window_small_and_the_text_exact():
    data = b"\xc3" * 4000 + "€ok".encode()
    d, text, widest = detokenize(data)
    assert text == data.decode("utf-8", errors="replace") == "\ufffd" * 4000 + "€ok"
    assert widest <= 2 * (MAX_CHAR_TOKENS + 1)


def test_characters_split_over_tokens_are_held_until_complete():
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok)
    for b in "a€".encode()[:3]:  # "a" and two of the euro sign's three bytes
        d.add(b)
    assert d.text == "a"  # the euro sign's third byte has not come yet
    d.add("€".encode()[2])
    assert d.text == "a€"


def test_random_mixes_of_valid_text_and_junk_bytes_decode_like_the_whole():
    rng = random.Random(7)
    pieces = ["a", "é", "€", "𝄞", " ", "x"]
    junk = [b"\xc3", b"\xe2\x82", b"\xf0\x9d", b"\x80", b"\xff"]
    for _ in range(200):
        data = b"".join(rng.choice(pieces).encode() if rng.random() < 0.6 else rng.choice(junk)
                        for _ in range(rng.randrange(1, 60)))
        data += b"."  # complete the tail, so the whole decodes to final text
        d, text, widest = detokenize(data)
        assert text == data.decode("utf-8", errors="replace"), data
        assert widest <= 2 * (MAX_CHAR_TOKENS + 1)


def test_stop_strings_still_cut_after_junk():
    d, text, _ = detokenize(b"\xc3" * 10 + b"helloSTOPmore", stop=("STOP",))
    assert text == "\ufffd" * 10 + "hello"
