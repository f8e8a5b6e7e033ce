"""Incremental detokenization of a request's output, and stop strings.

Decodes only a short window of recent tokens per step (a byte-level tokenizer can leave a
character half-finished: such text is held until complete). The window stays bounded: once more
tokens than one character can span are pending, bytes that no later token can complete are
emitted as U+FFFD, so a run of invalid UTF-8 costs linear time. Stop strings end the request at
their first occurrence and are never emitted; while a request runs, the last
`len(longest stop) - 1` characters are held back so no streamed chunk carries a stop string's
beginning that later turns out to complete it.
"""
from __future__ import annotations

from rayinfer.tokenizer import Tokenizer

MAX_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so it spans at most 4 tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # all decoded output text so far (truncated at a stop string)
        self.emitted = 0  # characters of `text` already returned

    def add(self, token_id: int | None, find_stop: bool = True) -> bool:
        """Appends one token (None: nothing to add); returns True when a stop string completed.
        With `find_stop` False (before min_tokens) stop strings in the new text are kept as text."""
        if token_id is None:
            return False
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            return self._commit(full[len(prefix):], len(self.ids), find_stop)
        if len(self.ids) - self.read_offset > MAX_CHAR_TOKENS:
            # The oldest pending bytes can no longer become a character: commit up to the last cut whose
            # text the later tokens extend (so a character still being completed stays pending).
            for cut in range(len(self.ids) - 1, self.read_offset, -1):
                head = self.tok.decode(self.ids[self.prefix_offset:cut])
                if len(prefix) < len(head) < len(full) and full.startswith(head):
                    return self._commit(head[len(prefix):], cut, find_stop)
        return False

    def _commit(self, new_text: str, read_to: int, find_stop: bool) -> bool:
        before = len(self.text)
        self.text += new_text
        self.prefix_offset, self.read_offset = self.read_offset, read_to
        return find_stop and self._find_stop(before)

    def _find_stop(self, before: int) -> bool:
        hits = [at for s in self.stop if (at := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def take(self, finished: bool) -> str:
        """New text that is safe to emit now (everything, once the request finished)."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        chunk = self.text[self.emitted:end]
        self.emitted = end
        return chunk
