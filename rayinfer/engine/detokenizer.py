"""Incremental detokenization of a request's output, and stop strings.

Decodes only a short window of recent tokens per step (a byte-level tokenizer can leave a
character half-finished: such text is held until complete). Stop strings end the request at
their first occurrence and are never emitted; while a request runs, the last
`len(longest stop) - 1` characters are held back so no streamed chunk carries a stop string's
beginning that later turns out to complete it.
"""
from __future__ import annotations

from rayinfer.tokenizer import Tokenizer


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
        if token_id is not None:
            self.ids.append(token_id)
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
            full = self.tok.decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                before = len(self.text)
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return find_stop and self._find_stop(before)
        return False

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
